"""Qwen All-in-One (GGUF): one small Qwen model on a CPU, two roles — sentiment with a confidence, then a reply.

    >>> from allinone_gguf import AllInOne
    >>> with AllInOne("models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf") as bot:  # doctest: +SKIP
    ...     s = bot.classify("今天的实验终于成功了，太棒了！")
    ...     print(s.label, f"{s.confidence:.0%}", bot.reply("今天的实验终于成功了，太棒了！", sentiment=s))
"""
from .backend import ModelLoadError
from .config import Settings
from .engine import AllInOne, Sentiment

__all__ = ["AllInOne", "ModelLoadError", "Sentiment", "Settings"]
