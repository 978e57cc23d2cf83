"""The package's layering (pyproject ``[tool.importlinter]``) holds: ``lint-imports`` exits 0.

Layers point down (CLI, applications, stages, scoring, data, the base), no package has
an import cycle, only ``mner.cache`` imports h5py, only the CLI imports typer, and the
report does not reach into the heads. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    proc = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "Contracts: 5 kept, 0 broken." in proc.stdout
