"""Where the models run: device names and mixed precision, one policy for every command.

Every command resolves ``device: auto`` and its precision setting here, once per run:

* :func:`resolve_precision` turns a setting (``auto``, ``fp32``/``off``, ``bf16``,
  ``fp16``) into the autocast precision of a *new* run (``mner extract``, ``mner train``).
  ``auto`` is bfloat16 on CUDA devices that support it, else float16; on a CPU it is
  bfloat16 where oneDNN has native bfloat16 (AVX512-BF16 / AMX), else float32.
* :func:`replay_precision` reuses a *recorded* precision (a cache's, a run's) on the
  device at hand: ``mner evaluate``, ``mner predict``, re-extraction for predict, and
  ``--resume``. float16 autocast exists only on CUDA; replayed on a CPU it becomes float32
  with a warning, except where continuing in another precision would change a result that
  must be reproduced exactly (resume, extending a cache), which is an error.
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


#: Settings accepted by :func:`resolve_precision` (``off`` is ``fp32``).
PRECISION_SETTINGS = ("auto", "fp32", "off", "bf16", "fp16")


def resolve_precision(setting: str, device: torch.device, *, what: str = "precision") -> str:
    """The autocast precision (``fp32``, ``bf16`` or ``fp16``) of a new run on ``device``.

    Args:
        setting: ``auto``, ``fp32`` (or ``off``), ``bf16`` or ``fp16``.
        device: where the run computes.
        what: the config key, for messages (``extract.precision``, ``train.amp``).

    Raises:
        ConfigError: an unknown setting, or ``fp16`` on a CPU (float16 autocast on a CPU
            is slower than float32 and not what any paper ran).
    """
    if setting not in PRECISION_SETTINGS:
        raise ConfigError(f"{what} {setting!r}: use one of {', '.join(PRECISION_SETTINGS)}")
    if setting in ("fp32", "off"):
        return "fp32"
    if device.type == "cuda":
        if setting == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return setting
    if setting == "fp16":
        raise ConfigError(f"{what} fp16 needs a CUDA device (running on {device.type}); use bf16, auto or fp32")
    if setting == "bf16":
        return "bf16"
    return "bf16" if cpu_has_bf16() else "fp32"


def replay_precision(recorded: str, device: torch.device, *, exact: bool = False,
                     where: str = "", warn=None) -> str:
    """A recorded precision, reused on ``device``.

    Args:
        recorded: ``fp32``, ``bf16`` or ``fp16`` as a cache or run recorded it.
        device: where this command computes.
        exact: True where results must continue bit for bit (``--resume``, extending a
            cache): a precision this device lacks is then an error instead of a fallback.
        where: the cache or run folder, for messages.
        warn: called with a one-line warning when falling back (default: stderr).

    Returns:
        ``recorded`` where the device has it; ``fp32`` for float16 off CUDA.

    Raises:
        ConfigError: ``exact`` and the device lacks the recorded precision.
    """
    if recorded not in AUTOCAST_DTYPES:
        raise ConfigError(f"{where}: recorded precision {recorded!r} is not one of fp32, bf16, fp16")
    if recorded == "fp16" and device.type != "cuda":
        if exact:
            raise ConfigError(f"{where}: made in float16 on CUDA, which a {device.type} cannot continue "
                              "exactly; continue it on a CUDA machine or start anew (--overwrite)")
        import sys

        (warn or (lambda m: print(m, file=sys.stderr)))(
            f"warning: {where}: made in float16 on CUDA; computing in float32 on {device.type}, "
            "so results may differ from the recorded ones in the last digits")
        return "fp32"
    return recorded


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` (``bf16``/``fp16``) on ``device``; no-op for ``fp32``."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
