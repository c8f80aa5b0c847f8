"""The runtime: one GGUF model in one llama.cpp context serving both roles (sentiment and reply).

Everything the faces (app, CLI) and the measurement (bench, evaluate) may use is exported here.
"""
from .backend import ModelLoadError
from .config import Settings
from .engine import AllInOne, Sentiment

__all__ = ["AllInOne", "ModelLoadError", "Sentiment", "Settings"]
