"""Where the models run: device names and mixed precision, the same rules for both stages.

Both stages resolve ``device: auto`` and their precision setting here, so an extraction
and a training run on one machine make the same choice, and ``bf16`` means the same
thing in ``extract.precision`` and ``train.amp``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mner.errors import ConfigError

#: Precision names -> autocast dtypes (``fp32``: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:i`` pass through.

    Raises:
        ConfigError: for a name torch does not know, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: use auto, cpu or cuda[:i]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is visible here; use device cpu or auto")
    return dev


def cpu_has_bf16() -> bool:
    """Whether oneDNN reports native bfloat16 arithmetic on this CPU (AVX512-BF16, AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private probe; absent in some builds
        return False


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` (``bf16``/``fp16``) on ``device``; no-op for ``fp32``."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
