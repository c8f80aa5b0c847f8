"""Serving figures: one and several concurrent streams against the engine's own ceiling, in the same run.

    python -m allinone_gguf.measure.bench_serving MODEL.gguf [--threads 2] [--tokens 64]   # part of `make bench`

For every slot count P in 1, 2, 4, 8 it starts a fresh process with `parallel=P`, runs P concurrent streams
(and, for P=1, also 4 streams that queue), and reports aggregate and per-stream tokens/s, time to first token
(p50/p95) and the process's RSS. In the same run it measures bare llama.cpp loops on the same file and threads
(runtime/ceiling.py): generation with 1, 2, 4 and 8 sequences per llama_decode, and a prefill of as many tokens
as our prompt has. Ratios against those are what compares across machines; absolute figures come with the
machine and date. Results: a Markdown table on stdout and JSON in bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..paths import RESULTS_DIR, ROOT
from .bench_worker import REPLY_TOKENS, percentile
from .machine import cpu_info, rss_mb, write_result

PROMPTS = ["今天终于把拖了很久的报告写完了，感觉轻松多了。", "快递又延误了，客服也联系不上，真让人生气。",
           "周末和朋友去爬山，风景特别好。", "最近睡眠不太好，白天总是没精神。",
           "面试通过了，下周一就去新公司报到！", "排了一个小时的队，结果卖完了。",
           "孩子第一次自己骑车，我好骄傲。", "项目被推迟，团队的努力好像白费了。"]
SLOTS = (1, 2, 4, 8)


def run_streams(model: str, threads: int, parallel: int, streams: int, tokens: int) -> dict:
    """In this process: `streams` concurrent replies on an engine with `parallel` slots."""
    from allinone_gguf import AllInOne
    with AllInOne(model, n_threads=threads, parallel=parallel, n_ctx=2048 + 512 * max(0, parallel - 2)) as bot:
        bot.reply("你好", max_tokens=4, seed=0)                        # warm-up, left out
        results: list[dict] = [{} for _ in range(streams)]
        barrier = threading.Barrier(streams)

        def one(i: int) -> None:
            barrier.wait()
            start = time.perf_counter()
            stream = bot.stream_reply(PROMPTS[i % len(PROMPTS)], max_tokens=tokens, seed=i, temperature=0.7)
            first = None
            for _ in stream:
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            n = stream.usage["completion_tokens"]
            results[i] = {"ttft": (first or end) - start, "tokens": n, "start": start, "end": end,
                          "tps": (n - 1) / (end - first) if first and n > 1 and end > first else float("nan"),
                          "prompt_tokens": stream.usage["prompt_tokens"],
                          "cached_tokens": stream.usage["cached_tokens"]}

        before = bot.stats()
        workers = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        after = bot.stats()
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        total = sum(r["tokens"] for r in results)
        return {"parallel": parallel, "streams": streams, "tokens": total, "wall_s": wall,
                "aggregate_tps": total / wall, "per_stream_tps": statistics.fmean(r["tps"] for r in results),
                "ttft_p50_s": percentile([r["ttft"] for r in results], 50),
                "ttft_p95_s": percentile([r["ttft"] for r in results], 95),
                "prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in results),
                "cached_tokens": statistics.fmean(r["cached_tokens"] for r in results),
                "decoded_tokens": after["decoded_tokens"] - before["decoded_tokens"],
                "batches": after["batches"] - before["batches"], "rss_mb": rss_mb()}


def _subprocess(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-m", "allinone_gguf.measure.bench_serving", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"bench_serving {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(model: str, threads: int, tokens: int, slots=SLOTS) -> dict:
    from allinone_gguf.runtime.ceiling import bare_generation_tps, bare_prefill_s
    runs = []
    for p in slots:
        print(f"  {p} slot(s), {p} stream(s) ...", file=sys.stderr, flush=True)
        runs.append(_subprocess(["--worker", model, str(threads), str(p), str(p), str(tokens)]))
        if p == 1:
            print("  1 slot, 4 streams queued ...", file=sys.stderr, flush=True)
            runs.append(_subprocess(["--worker", model, str(threads), "1", "4", str(tokens)]))
    print("  bare llama_decode loops ...", file=sys.stderr, flush=True)
    ceiling = {str(k): bare_generation_tps(model, n_threads=threads, streams=k, tokens=tokens) for k in slots}
    single = next(r for r in runs if r["parallel"] == 1 and r["streams"] == 1)
    prefill_s, prefill_n = bare_prefill_s(model, round(single["prompt_tokens"]), n_threads=threads)
    eight = next((r for r in runs if r["streams"] == max(slots) and r["parallel"] == max(slots)), None)
    return {
        "model": str(model), "threads": threads, "tokens_per_stream": tokens,
        "machine": {**cpu_info(), "python": platform.python_version()},
        "date": datetime.date.today().isoformat(), "runs": runs, "ceiling_tps": ceiling,
        "bare_prefill_s": prefill_s, "bare_prefill_tokens": prefill_n,
        "ratios": {
            "single_stream_vs_ceiling": single["per_stream_tps"] / ceiling["1"],
            "ttft_vs_bare_prefill": single["ttft_p50_s"] / prefill_s,
            "aggregate_8_vs_1": (eight["aggregate_tps"] / single["aggregate_tps"]) if eight else None,
        },
    }


def render(r: dict) -> str:
    lines = [f"Serving on {Path(r['model']).name}, {r['threads']} threads, {r['tokens_per_stream']} new tokens a "
             f"stream; {r['machine']['cpu']} ({r['machine']['logical_cpus']} CPUs), {r['date']}", "",
             "| slots | streams | aggregate tok/s | per-stream tok/s | bare loop tok/s (same streams) | "
             "TTFT p50 | TTFT p95 | RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        bare = r["ceiling_tps"].get(str(run["streams"]))
        lines.append(f"| {run['parallel']} | {run['streams']} | {run['aggregate_tps']:.1f} | "
                     f"{run['per_stream_tps']:.1f} | {bare:.1f} | {run['ttft_p50_s'] * 1000:.0f} ms | "
                     f"{run['ttft_p95_s'] * 1000:.0f} ms | {run['rss_mb']:.0f} |" if bare else
                     f"| {run['parallel']} | {run['streams']} | {run['aggregate_tps']:.1f} | "
                     f"{run['per_stream_tps']:.1f} | – | {run['ttft_p50_s'] * 1000:.0f} ms | "
                     f"{run['ttft_p95_s'] * 1000:.0f} ms | {run['rss_mb']:.0f} |")
    q = r["ratios"]
    lines += ["", f"- single stream: {q['single_stream_vs_ceiling']:.2f} of the bare loop's tokens/s",
              f"- time to first token: {q['ttft_vs_bare_prefill']:.2f} × a bare prefill of "
              f"{r['bare_prefill_tokens']} tokens ({r['bare_prefill_s'] * 1000:.0f} ms)"]
    if q["aggregate_8_vs_1"] is not None:
        lines.append(f"- 8 streams in 8 slots: {q['aggregate_8_vs_1']:.2f} × one stream's aggregate tokens/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        model, threads, parallel, streams, tokens = argv[1:6]
        print(json.dumps(run_streams(model, int(threads), int(parallel), int(streams), int(tokens))))
        return 0
    ap = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.bench_serving",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="GGUF file")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    ap.add_argument("--tokens", type=int, default=REPLY_TOKENS, help=f"new tokens per stream (default: {REPLY_TOKENS})")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="folder for the JSON and Markdown result (default: bench/results)")
    args = ap.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: {args.model}: no such model file (make models builds it)", file=sys.stderr)
        return 2
    result = measure(args.model, args.threads, args.tokens)
    text = render(result)
    path = write_result("serving", args.model, result, text, args.out)
    print(text)
    print(f"\n(JSON and Markdown: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}, .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
