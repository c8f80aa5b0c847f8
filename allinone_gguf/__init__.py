"""Qwen All-in-One (GGUF): one small Qwen model on a CPU, two roles — sentiment with a confidence, then a reply.

    >>> from allinone_gguf import AllInOne
    >>> with AllInOne("models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf") as bot:  # doctest: +SKIP
    ...     s = bot.classify("今天的实验终于成功了，太棒了！")
    ...     print(s.label, f"{s.confidence:.0%}", bot.reply("今天的实验终于成功了，太棒了！", sentiment=s))

The tree shows the layers: `runtime/` loads the model and serves both roles; `faces/` is the command line
(and the app's helpers; app.py at the top wires Gradio); `measure/` is the benchmark and the evaluation.
The names below are loaded on first use, so `import allinone_gguf` (and `--help`) does not load llama.cpp.
"""
from __future__ import annotations

__all__ = ["AllInOne", "ModelLoadError", "Sentiment", "Settings"]


def __getattr__(name: str):
    if name in __all__:
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
