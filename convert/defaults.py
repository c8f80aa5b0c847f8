"""The pipeline's defaults, written once: which model `make models` converts, where the files go, and which
quant type the app and the CLI load.

    from convert.defaults import DEFAULT_SOURCE, MODELS_DIR, DEFAULT_QUANT

    >>> model_file("Qwen/Qwen1.5-0.5B-Chat", "Q8_0").as_posix()
    'models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q8_0.gguf'

Standard library only, so the faces' defaults (allinone_gguf/faces/defaults.py) and the Makefile, through
`python3 -m allinone_gguf.faces.defaults` before the virtual env exists, read them without numpy, gguf or
llama.cpp.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_SOURCE = "Qwen/Qwen1.5-0.5B-Chat"   # hub id (or folder) `make models` converts
MODELS_DIR = Path("models")                  # where `make models` writes and the app's model menu looks
DEFAULT_QUANT = "Q4_K_M"                     # the file the app and the CLI load: smallest and fastest
MANIFEST = "manifest.json"                   # beside the GGUF files: source, revision, inputs, outputs, sha256


def gguf_name(name: str, quant: str) -> str:
    """The file name `make models` gives quant type `quant` of the checkout `name`: <name>-<quant>.gguf."""
    return f"{name}-{quant}.gguf"


def model_file(source: str, quant: str = DEFAULT_QUANT, models_dir: Path = MODELS_DIR) -> Path:
    """Where `python -m convert all SOURCE --out MODELS_DIR` writes `quant`: <dir>/<name>/<name>-<quant>.gguf."""
    name = Path(source.rstrip("/")).name
    return Path(models_dir) / name / gguf_name(name, quant)
