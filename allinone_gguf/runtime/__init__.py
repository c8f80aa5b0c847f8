"""The runtime: one GGUF model in one llama.cpp context serving both roles (sentiment and reply).

Everything the faces (app, CLI) and the measurement (bench, evaluate) may use is exported here. The names are
loaded on first use, so importing `allinone_gguf.runtime.config` (for Settings, to build `--help`) does not
load llama.cpp and numpy.
"""
from __future__ import annotations

import importlib

# public name -> the module that defines it
_WHERE = {"AllInOne": ".engine", "AdapterError": ".adapter", "BRANCHES": ".engine", "ModelLoadError": ".backend", "Sentiment": ".sentiment",
          "Settings": ".config", "Closed": ".jobs", "ContextOverflow": ".jobs", "QueueFull": ".jobs",
          "ReplyStream": ".jobs", "TokenLogprob": ".jobs", "MAX_TOP_LOGPROBS": ".engine",
          "json_grammar": ".structured", "sigmoid": ".sentiment", "file_sha256": ".adapter",
          "model_family": ".adapter"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
