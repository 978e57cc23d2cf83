# Types of the lazily imported public API (mner/__init__.py loads them on first use).
from mner.apps.api import evaluate as evaluate
from mner.apps.api import export as export
from mner.apps.api import extract as extract
from mner.apps.api import load as load
from mner.apps.api import predict_file as predict_file
from mner.apps.api import train as train
from mner.apps.predict import Predictor as Predictor

__version__: str
__all__: list[str]
