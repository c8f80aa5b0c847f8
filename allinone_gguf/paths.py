"""Where things are, written once: the checkout, the bench results, the shared data sets, the optional envs.

    >>> from allinone_gguf.paths import RESULTS_DIR, ROOT
    >>> RESULTS_DIR.relative_to(ROOT).as_posix()
    'bench/results'

Standard library only. Paths are absolute, from this file: the package runs from its checkout (`make setup`
installs it editable). measure/baseline.py alone finds the checkout by itself, since it runs in .venv-ref
before the package is importable.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]             # the checkout: bench/, models/, .venv*/ live here
RESULTS_DIR = ROOT / "bench" / "results"                # every bench's JSON and Markdown (measure/machine.py)
SHARED_DATA = ROOT.parent / "shared" / "data" / "sentiment"   # the labelled `label,text` CSVs beside the checkout
# The optional environments: torch + transformers for the golden tests and the baseline (`make reference-env`),
# torch + peft for training the sentiment LoRA (`make tune-env`). An environment variable moves either.
REFERENCE_PYTHON = Path(os.environ.get("ALLINONE_REFERENCE_PYTHON") or ROOT / ".venv-ref" / "bin" / "python")
TUNE_PYTHON = Path(os.environ.get("ALLINONE_TUNE_PYTHON") or ROOT / ".venv-tune" / "bin" / "python")
