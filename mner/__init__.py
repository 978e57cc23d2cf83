"""mner: multimodal named entity recognition on cached vision features."""

__version__ = "0.1.0"
