"""User-facing errors.

Anything a user can cause (bad input file, wrong option, cache that does not fit the
model) raises a subclass of :class:`MnerError`. The CLI prints its message as one line,
without a traceback, and exits with status 2. Messages name the file and line (or image
id) and say how to fix the problem.
"""


class MnerError(Exception):
    """A user mistake or an environment problem with a known remedy."""


class DataError(MnerError):
    """Malformed dataset input (CoNLL files, side files, images folder)."""


class ConfigError(MnerError):
    """Unknown key, wrong type or impossible value in params.yaml or CLI overrides."""


class CacheError(MnerError):
    """A feature cache is missing, corrupt, or does not match what a model needs."""


class WeightsError(MnerError):
    """Pretrained weights cannot be loaded (offline with no local copy, wrong folder)."""


class LockError(MnerError):
    """Another live process is writing the same output (cache file, run folder, report)."""


def json_kind(value: object) -> str:
    """A JSON value's kind in words, for one-line messages about malformed input files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
