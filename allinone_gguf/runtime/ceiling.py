"""The engine's own ceiling: bare llama.cpp loops on a model file, with none of our serving code around them.

    >>> from allinone_gguf.runtime.ceiling import bare_prefill_s, bare_generation_tps  # doctest: +SKIP
    >>> bare_generation_tps("model.gguf", n_threads=2, streams=1, tokens=64)              # doctest: +SKIP
    27.4

The benchmark (measure/bench_serving.py) reports our speed as a ratio of these, measured in the same run on the
same file and threads, so machines of different speed still compare. It lives in the runtime because only the
runtime talks to llama.cpp.
"""
from __future__ import annotations

import time
from pathlib import Path

import llama_cpp
import numpy as np

from .backend import Backend


def _greedy(b: Backend, row: int) -> int:
    return int(b.logits_row(row).argmax())


def teacher_forced_argmax(path: str | Path, text: str, n_threads: int):
    """The most likely next token at every position of `text` (numpy array), from one forward pass with logits
    for every position: compares quantized files with their F16 source (measure/convert_bench.py)."""
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=n_threads, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        llm.eval(tokens)
        return np.asarray(llm.scores[: len(tokens)]).argmax(axis=1)
    finally:
        llm.close()


def bare_prefill_s(path: str | Path, n_tokens: int, *, n_threads: int, n_ctx: int = 2048,
                   repeats: int = 3) -> tuple[float, int]:
    """(median seconds, tokens) to decode a prompt of `n_tokens` tokens into an empty sequence."""
    b = Backend(path, n_ctx=n_ctx, n_threads=n_threads, n_seq=1)
    try:
        tokens = list(range(1000, 1000 + n_tokens))
        times = []
        for _ in range(repeats + 1):                   # the first run warms the caches and is left out
            b.forget(0)
            start = time.perf_counter()
            b.prefill(0, tokens)
            times.append(time.perf_counter() - start)
        times = sorted(times[1:])
        return times[len(times) // 2], len(tokens)
    finally:
        b.close()


def bare_generation_tps(path: str | Path, *, n_threads: int, streams: int = 1, tokens: int = 64,
                        prompt_tokens: int = 32, n_ctx: int = 4096, flash_attn: bool | None = None,
                        other_cells: int = 0) -> float:
    """Aggregate tokens/s of `streams` sequences each generating `tokens` greedy tokens, one llama_decode per
    step with every sequence's next token in it (the plain continuous-batching loop). `flash_attn`: None is
    llama.cpp's auto (on, on CPU); `other_cells`: one more sequence holds that many cells meanwhile, as our
    sentiment frame does beside the replies (every token's attention passes over them, masked)."""
    b = Backend(path, n_ctx=n_ctx, n_threads=n_threads, n_seq=streams + 1, flash_attn=flash_attn)
    try:
        if other_cells:
            b.prefill(streams, list(range(3000, 3000 + other_cells)))
        prompt = list(range(1000, 1000 + prompt_tokens))
        nxt = []
        for seq in range(streams):
            row, = b.decode([(seq, prompt, True)])
            nxt.append(_greedy(b, row))
        llama_cpp.llama_synchronize(b.ctx)
        start = time.perf_counter()
        for _ in range(tokens):
            rows = b.decode([(seq, [nxt[seq]], True) for seq in range(streams)])
            nxt = [_greedy(b, r) for r in rows]
        return streams * tokens / (time.perf_counter() - start)
    finally:
        b.close()
