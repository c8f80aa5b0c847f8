"""Runtime defaults, written once: every knob of `AllInOne` is a field of the frozen `Settings`.

CLI flags and UI controls are derived from the fields and their `help` metadata:

    >>> from allinone_gguf.runtime.config import Settings, field_help
    >>> Settings(n_threads=2).temperature, field_help("max_tokens")
    (0.7, 'most new tokens in one reply')
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .prompts import LABEL_SETS, SENTIMENT_PROMPTS

LABEL_LANGUAGES = tuple(LABEL_SETS)
# Slots: chosen from bench_serving's figures (README "Serving several people"): on 2 cores, 4 streams in 4 slots
# give 2.3x the tokens/s of one and a first token within 0.6 s, where 4 requests queued behind 1 slot wait 4-6 s.
PARALLEL = 4
# Entries of the sentiment cache (docs/cache.md): about 600 bytes each whatever the text's length (a text is kept as
# its sha256), so 2.4 MB at most; on a stream with 30 % repeated texts it gave 1.5x the texts/s on the stand-in.
SENTIMENT_CACHE = 4096


def _default_threads() -> int:
    # llama.cpp scales to the physical cores; more threads than cores only adds contention.
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Settings:
    """Everything `AllInOne` can be told; `AllInOne(path, n_threads=2)` overrides single fields."""

    n_ctx: int = field(default=2048, metadata={
        "help": "context size in tokens, shared by both roles (the sentiment role reserves "
                "its prompt plus sentiment_tokens; the chat gets the rest)"})
    n_threads: int = field(default_factory=_default_threads, metadata={
        "help": "CPU threads for prompt processing and generation"})
    labels: str = field(default="zh", metadata={
        "help": "label language: zh (正面/负面) or en (Positive/Negative)"})
    temperature: float = field(default=0.7, metadata={
        "help": "reply sampling temperature; 0 = greedy"})
    top_p: float = field(default=0.9, metadata={"help": "reply nucleus sampling: keep this probability mass"})
    top_k: int = field(default=20, metadata={
        "help": "reply sampling: keep the k likeliest tokens (Qwen's generation_config uses 20)"})
    repeat_penalty: float = field(default=1.1, metadata={
        "help": "reply repetition penalty (Qwen's generation_config uses 1.1; 1.0 = off)"})
    max_tokens: int = field(default=128, metadata={"help": "most new tokens in one reply"})
    seed: int | None = field(default=None, metadata={
        "help": "sampling seed for reproducible replies; None = random"})
    sentiment_prompt: str = field(default="fewshot", metadata={
        "help": "sentiment prompt variant from allinone_gguf/runtime/prompts.py (SENTIMENT_PROMPTS)"})
    sentiment_tokens: int = field(default=256, metadata={
        "help": "longest text the sentiment role reads, in tokens; longer texts keep their head and tail"})
    sentiment_adapter: str = field(default="auto", metadata={
        "help": "sentiment LoRA: auto (<model>.sentiment-lora.gguf beside the model, when there), off, or a path; "
                "applied to the sentiment role only"})
    sentiment_bias: float = field(default=0.0, metadata={
        "help": "added to log P(positive) - log P(negative) before choosing; > 0 leans positive"})
    sentiment_cache: int = field(default=SENTIMENT_CACHE, metadata={
        "help": "sentiment answers kept for texts seen before, in entries (about 600 bytes each; the least "
                "recently used go first): a repeated text is answered without decoding; 0 = off"})
    parallel: int = field(default=PARALLEL, metadata={
        "help": "conversations whose KV cache is kept (slots), and replies decoded together in one batch"})
    max_queue: int = field(default=64, metadata={
        "help": "requests that may wait for the model; more are refused at once (HTTP 503)"})
    queue_timeout: float = field(default=300.0, metadata={
        "help": "seconds a request may wait for the model before it is refused"})
    max_text_chars: int = field(default=65_536, metadata={
        "help": "longest text or message read, in characters, bounding the tokenizer's work: a longer text keeps "
                "its head and tail (a chat request that may not be shortened is refused)"})
    max_history_chars: int = field(default=400_000, metadata={
        "help": "longest history accepted with one request, in characters (older turns beyond the "
                "context are dropped anyway)"})
    thinking: bool = field(default=False, metadata={
        "help": "let a model with a thinking mode (Qwen3) think before replying; the thinking is never shown"})

    def __post_init__(self) -> None:
        if self.labels not in LABEL_LANGUAGES:
            raise ValueError(f"labels must be one of {LABEL_LANGUAGES}, not {self.labels!r}")
        if self.n_ctx < 256:
            raise ValueError(f"n_ctx must be at least 256 tokens, not {self.n_ctx}")
        if self.n_threads < 1:
            raise ValueError(f"n_threads must be at least 1, not {self.n_threads}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.parallel < 1 or self.max_queue < 1 or self.queue_timeout <= 0:
            raise ValueError(f"parallel and max_queue must be at least 1 and queue_timeout > 0, not "
                             f"{self.parallel}, {self.max_queue}, {self.queue_timeout}")
        if self.max_text_chars < 1024:
            raise ValueError(f"max_text_chars must be at least 1024, not {self.max_text_chars}")
        if self.sentiment_tokens < 16:
            raise ValueError(f"sentiment_tokens must be at least 16, not {self.sentiment_tokens}")
        if self.sentiment_cache < 0:
            raise ValueError(f"sentiment_cache must be >= 0 entries (0 = off), not {self.sentiment_cache}")
        if self.sentiment_prompt not in SENTIMENT_PROMPTS:
            raise ValueError(f"sentiment_prompt must be one of {sorted(SENTIMENT_PROMPTS)}, "
                             f"not {self.sentiment_prompt!r}")

    def replace(self, **overrides) -> "Settings":
        """A copy with some fields changed; unknown names are a clear error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **overrides)


def field_help(name: str) -> str:
    """The help text of one Settings field (for CLI flags and UI controls)."""
    for f in dataclasses.fields(Settings):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(name)
