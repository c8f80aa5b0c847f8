"""Where a serving step's time goes: llama.cpp's own decode time (its perf counters, through `AllInOne.stats()`)
against the wall clock, for 1, 4 and 8 concurrent replies through the runtime alone (no sentiment, no HTTP). What
is left outside llama_decode is the worker's Python (sampling, detokenising, hand-off to the streams) and idling.

    python -m allinone_gguf.measure.step_profile models/qwen-proxy-0.5b-chat-hf/qwen-proxy-0.5b-chat-hf-Q4_K_M.gguf
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

from .machine import cpu_info


def profile(model: str, streams: int, tokens: int, threads: int) -> dict:
    from ..runtime import AllInOne
    with AllInOne(model, n_threads=threads, parallel=max(streams, 1), n_ctx=4096, sentiment_cache=0) as bot:
        bot.reply("你好", max_tokens=4, seed=1)                     # warm-up, left out
        pieces: dict[int, int] = {}

        def one(i: int) -> None:
            pieces[i] = len(list(bot.stream_reply(f"请写一段关于第{i}个季节的长文章，越长越好。", max_tokens=tokens,
                                                  seed=i, temperature=0.7)))
        before, started = bot.stats(), time.perf_counter()
        workers = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall, after = time.perf_counter() - started, bot.stats()
    decode = sum(after[k] - before[k] for k in ("single_ms", "prompt_ms")) / 1000
    batches = after["batches"] - before["batches"]
    return {"streams": streams, "pieces": sum(pieces.values()), "wall_s": round(wall, 3), "decode_s": round(decode, 3),
            "decode_share": round(decode / wall, 3), "batches": batches,
            "outside_ms_per_batch": round((wall - decode) * 1000 / max(1, batches), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.step_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=96, help="new tokens per reply (default: 96)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    a = p.parse_args(argv)
    print(f"{cpu_info()['cpu']}, {a.threads} threads, {time.strftime('%Y-%m-%d')}")
    print("| streams | pieces | wall s | in llama_decode | batches | outside decode, ms a batch |\n|---|---|---|---|---|---|")
    for n in (1, 4, 8):
        r = profile(a.model, n, a.tokens, a.threads)
        print(f"| {n} | {r['pieces']} | {r['wall_s']} | {r['decode_share']:.0%} | {r['batches']} | "
              f"{r['outside_ms_per_batch']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
