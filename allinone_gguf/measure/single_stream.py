"""One reply's generation speed through the runtime against bare llama_decode loops on the same file and threads,
in the same run: with llama.cpp's flash attention on (its auto, what the runtime gets) and off, with and without
another sequence's cells beside it (the runtime keeps its sentiment frame in the same context).

    python -m allinone_gguf.measure.single_stream MODEL.gguf [--threads 2] [--repeats 3]

Runs alternate (ours, then each bare loop, repeated) so a change in the machine's load touches every row alike;
each row is the median of the repeats, tokens/s counted after the first token. Each run is a fresh process: a bare
loop leaves an OpenMP thread team on the thread that called llama.cpp, and a runtime started after it in the same
process (its worker thread gets a team of its own) decoded a third slower (39 instead of 56 tokens/s on 2 threads).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from .machine import cpu_info

TOKENS = 64


def ours_tps(model: str, threads: int, seed: int) -> tuple[float, int]:
    """(tokens/s after the first token, cells the sentiment frame holds) of one reply through AllInOne."""
    from ..runtime import AllInOne
    with AllInOne(model, n_threads=threads, sentiment_cache=0) as bot:
        bot.reply("你好", max_tokens=4, seed=1)                     # warm-up, left out
        frame = len(bot.sentiment_inputs(["好"])[0][0])
        with bot.stream_reply("请写一段关于春天的长文章，越长越好。", max_tokens=TOKENS, seed=seed) as stream:
            pieces = iter(stream)
            next(pieces)
            start = time.perf_counter()
            for _ in pieces:
                pass
            seconds = time.perf_counter() - start
        return (stream.usage["completion_tokens"] - 1) / seconds, frame


def bare_tps(model: str, threads: int, flash_attn: bool | None, other_cells: int) -> float:
    from ..runtime.ceiling import bare_generation_tps
    return bare_generation_tps(model, n_threads=threads, tokens=TOKENS, flash_attn=flash_attn, other_cells=other_cells)


def isolated(fn, *args):
    """fn(*args) in a fresh process (see the module's docstring)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.single_stream",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each row (default: 3)")
    a = p.parse_args(argv)
    rows: dict[str, list[float]] = {}
    frame = 0
    for r in range(a.repeats):
        tps, frame = isolated(ours_tps, a.model, a.threads, r)
        rows.setdefault("ours (AllInOne.stream_reply)", []).append(tps)
        for fa in (None, False):
            for other in (0, frame):
                name = (f"bare loop, flash attention {'on (auto)' if fa is None else 'off'}"
                        + (f", {other} cells of another sequence" if other else ""))
                rows.setdefault(name, []).append(isolated(bare_tps, a.model, a.threads, fa, other))
    base = statistics.median(rows["bare loop, flash attention on (auto)"])
    print(f"{cpu_info()['cpu']}, {a.threads} threads, {time.strftime('%Y-%m-%d')}, {TOKENS} tokens, median of "
          f"{a.repeats}\n\n| generation | tokens/s | vs the bare loop (flash attention on) |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
