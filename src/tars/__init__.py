"""tars: measure and close the modality reasoning gap of Speech LLMs."""

__version__ = "0.1.0"
