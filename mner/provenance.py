"""Content hashes and the version stamp that tie every number to what produced it.

Used for the weights recorded in a cache, the data files and cache recorded in a run
folder, and (through those) the report's provenance section.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (caches can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mner_version() -> str:
    """The mner version stamped into caches, run folders and reports.

    ``mner.__version__`` is the one source: it is what the code running now says it is,
    even from a source checkout whose installed metadata is older or absent.
    """
    from mner import __version__

    return __version__
