"""The pipeline's defaults, written once: which model `make models` converts, where the files go, and which
quant type the app and the CLI load.

    from convert.defaults import DEFAULT_SOURCE, MODELS_DIR, DEFAULT_QUANT

Standard library only, so the faces' defaults (allinone_gguf/faces/defaults.py) and the Makefile, through
`python3 -m allinone_gguf.faces.defaults` before the virtual env exists, read them without numpy, gguf or
llama.cpp.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_SOURCE = "Qwen/Qwen1.5-0.5B-Chat"   # hub id (or folder) `make models` converts
MODELS_DIR = Path("models")                  # where `make models` writes and the app's model menu looks
DEFAULT_QUANT = "Q4_K_M"                     # the file the app and the CLI load: smallest and fastest
