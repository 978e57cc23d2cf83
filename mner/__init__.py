"""mner: multimodal named entity recognition on cached vision features.

The public Python API (lazy: ``import mner`` loads no torch until a function is used)::

    import mner
    tagger = mner.load("runs/umt")                 # a run folder, or a folder `mner export` wrote
    tagger("Kevin Durant visits Oakland", "photo.jpg")   # entities, Hugging Face pipeline shape
    mner.extract(images="data/images", out="cache/x.h5", data="data", profile="tiny")
    mner.train(data="data", features="cache/x.h5", out="runs/umt", model="umt", profile="tiny")
    mner.evaluate("runs/umt", "data/test.txt")
    mner.predict_file("runs/umt", "posts.jsonl", "predictions.jsonl")
    mner.export("runs/umt", "models/umt")

See :mod:`mner.apps.api` and the "Python API" section of the README.
"""

from __future__ import annotations

import importlib
import types

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "load": "mner.apps.api",
    "evaluate": "mner.apps.api",
    "predict_file": "mner.apps.api",
    "export": "mner.apps.api",
    "Predictor": "mner.apps.predict",
}

__all__ = ["Predictor", "__version__", "evaluate", "export", "extract", "load", "predict_file", "train"]

# Type checkers read the names' signatures from ``__init__.pyi``; importing them here
# would load torch on ``import mner`` (and make the bottom layers import the top one).


class _CallableStage(types.ModuleType):
    """A stage package that is also its API function.

    ``mner.train`` and ``mner.extract`` are packages (``mner.train.config``, ...), and
    Python binds a package to its parent's attribute when it is imported, so a function
    of that name would be replaced by the module. Instead the package itself is callable:
    ``mner.train(...)`` is :func:`mner.apps.api.train` and ``mner.extract(...)`` is
    :func:`mner.apps.api.extract`.
    """

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module("mner.apps.api"), self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


for _stage in ("extract", "train"):  # their __init__ modules import nothing: cheap
    importlib.import_module(f"mner.{_stage}").__class__ = _CallableStage


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
