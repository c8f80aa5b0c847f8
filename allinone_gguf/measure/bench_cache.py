"""`make bench-cache`: what the sentiment cache buys on a moderation-like stream in which texts come back.

    python -m allinone_gguf.measure.bench_cache MODEL.gguf [--texts 300] [--repeats 0.3] [--threads 1]

The stream is built here from the texts of ../shared/data/sentiment/*.dev200.csv (read where they are, never
copied): shuffled with --seed, and at exactly --repeats of the positions (never the first) a copy of an earlier
text, chosen uniformly, as a moderation queue sees pasted and spammed messages. It is classified by a fresh engine
(so the cache starts empty) with the cache off (sentiment_cache=0) and one with it on (Settings' default size),
side by side, taking turns --chunk texts each so that both see the same load on a shared machine, two ways:

- file: groups of BRANCHES texts through classify_many, in order, as `classify` reads a file;
- messages: one classify() per text, as the app's messages arrive; every call is timed, so the time a repeated
  text takes to answer is measured as a caller sees it.

Per run: texts/s, llama.cpp's decoded tokens and the cache's hits and misses (AllInOne.stats()), and how far the
answers are from the cache-off run's (labels that differ, largest confidence difference). A warm-up on the bench's
sample messages (none of them in the stream) is left out. Results: Markdown on stdout, and
bench/results/cache-<date>-<model>.json and .md (measure/machine.py), with the machine, the CPUs this process
may run on, and the date.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time
from pathlib import Path

from ..paths import RESULTS_DIR, SHARED_DATA
from ..scoring import read_labeled_csv
from .bench_worker import latency_summary, sample_texts
from .machine import cpu_info, git_commit, write_result

MODES = ("file", "messages")


def build_stream(sources: list[Path], n: int, repeats: float, seed: int) -> tuple[list[str], list[bool]]:
    """(texts, is_repeat per position): n texts of which round(n * repeats) are copies of an earlier one."""
    pool = sorted({t for path in sources for _, t in read_labeled_csv(path, empty="skip")})
    n_repeats = round(n * repeats)
    rng = random.Random(seed)
    rng.shuffle(pool)
    if n - n_repeats > len(pool):
        raise SystemExit(f"--texts {n} with --repeats {repeats} needs {n - n_repeats} distinct texts; "
                         f"the data has {len(pool)}")
    copies = set(rng.sample(range(1, n), n_repeats))
    texts, fresh = [], iter(pool)
    for i in range(n):
        texts.append(rng.choice(texts) if i in copies else next(fresh))
    return texts, [i in copies for i in range(n)]


def run_pair(model: str, texts: list[str], repeated: list[bool], mode: str, threads: int, chunk: int) -> dict:
    """Two fresh engines, cache off and on, through the same stream one way, taking turns a chunk of texts each
    (the first to go alternates): on a shared machine both see the same load. Per engine: wall and CPU seconds
    (the process's, while only that engine works), its answers, and in messages mode each call's time."""
    from ..runtime import BRANCHES, AllInOne
    runs = {"off": {"sentiment_cache": 0}, "on": {}}
    bots = {key: AllInOne(model, n_threads=threads, parallel=1, **extra) for key, extra in runs.items()}
    try:
        for bot in bots.values():
            for kind in sample_texts().values():        # warm-up, left out
                bot.classify_many(kind[:4])
        before = {key: bot.stats() for key, bot in bots.items()}
        for r in runs.values():
            r.update(wall=0.0, cpu=0.0, answers=[], seconds=[], load=[os.getloadavg()[0]])
        for n, i in enumerate(range(0, len(texts), chunk)):
            part = texts[i:i + chunk]
            for key in (("off", "on") if n % 2 == 0 else ("on", "off")):
                bot, r = bots[key], runs[key]
                cpu, start = time.process_time(), time.perf_counter()
                if mode == "file":
                    for j in range(0, len(part), BRANCHES):
                        r["answers"] += bot.classify_many(part[j:j + BRANCHES])
                else:
                    for text in part:
                        t0 = time.perf_counter()
                        r["answers"].append(bot.classify(text))
                        r["seconds"].append(time.perf_counter() - t0)
                r["wall"] += time.perf_counter() - start
                r["cpu"] += time.process_time() - cpu
        out = {}
        for key, bot in bots.items():
            r, after = runs[key], bot.stats()
            out[key] = {"mode": mode, "sentiment_cache": bot.settings.sentiment_cache, "source": r["answers"][0].source,
                        "texts": len(texts), "seconds": r["wall"], "texts_per_s": len(texts) / r["wall"],
                        "cpu_s": r["cpu"], "texts_per_cpu_s": len(texts) / r["cpu"],
                        "loadavg_1min": r["load"] + [os.getloadavg()[0]],
                        "decoded_tokens": after["decoded_tokens"] - before[key]["decoded_tokens"],
                        "hits": after["sentiment_cache_hits"] - before[key]["sentiment_cache_hits"],
                        "misses": after["sentiment_cache_misses"] - before[key]["sentiment_cache_misses"],
                        "answers": [(a.label, a.confidence) for a in r["answers"]]}
            if r["seconds"]:
                for name, want in (("repeated", True), ("first_seen", False)):
                    secs = [x for x, rep in zip(r["seconds"], repeated) if rep == want]
                    out[key][name] = {**latency_summary(secs, [t for t, rep in zip(texts, repeated) if rep == want]),
                                      "max_ms": max(secs) * 1000}
    finally:
        for bot in bots.values():
            bot.close()
    return out


def compare(on: dict, off: dict) -> dict:
    """How far the cache-on answers are from the cache-off ones, and the speed-up."""
    pairs = list(zip(on.pop("answers"), off.pop("answers")))
    return {"speedup": on["texts_per_s"] / off["texts_per_s"],
            "cpu_speedup": on["texts_per_cpu_s"] / off["texts_per_cpu_s"],
            "labels_differ": sum(a[0] != b[0] for a, b in pairs),
            "max_confidence_diff": max(abs(a[1] - b[1]) for a, b in pairs)}


def render(report: dict) -> str:
    c = report["conditions"]
    note = f" ({report['note']})" if report.get("note") else ""
    lines = [f"Sentiment cache — {report['model']}{note} — {c['date']}, {c['cpu']}, {report['threads']} thread(s), "
             f"CPUs allowed {c['cpus_allowed']}, load average {c['loadavg'][0]:.1f}",
             "", f"Stream: {report['stream']['texts']} texts, {report['stream']['repeated']} of them repeats "
             f"({report['stream']['repeats']:.0%}), {report['stream']['mean_chars']:.0f} characters on average; "
             f"sentiment by {report['runs']['file']['on']['source']}.", "",
             "| mode | cache | texts/s | speed-up | texts per CPU-s | speed-up (CPU) | decoded tokens | hits | misses "
             "| labels ≠ off | max Δ confidence |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        r = report["runs"][mode]
        for key in ("off", "on"):
            x = r[key]
            v = r["vs_off"] if key == "on" else {"speedup": 1.0, "cpu_speedup": 1.0}
            same = f"{v['labels_differ']} | {v['max_confidence_diff']:.1e}" if key == "on" else "– | –"
            lines.append(f"| {mode} | {x['sentiment_cache']} | {x['texts_per_s']:.2f} | {v['speedup']:.2f}× | "
                         f"{x['texts_per_cpu_s']:.2f} | {v['cpu_speedup']:.2f}× | {x['decoded_tokens']} | {x['hits']} | "
                         f"{x['misses']} | {same} |")
    m = report["runs"]["messages"]
    rep, first = m["on"]["repeated"], m["on"]["first_seen"]
    lines += ["", "| one classify() with the cache on (messages mode) | p50 ms | p95 ms | max ms |", "|---|---|---|---|",
              f"| a repeated text | {rep['p50_ms']:.3f} | {rep['p95_ms']:.3f} | {rep['max_ms']:.3f} |",
              f"| a text seen for the first time | {first['p50_ms']:.0f} | {first['p95_ms']:.0f} | – |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.bench_cache",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--data", nargs="+", type=Path, default=sorted(SHARED_DATA.glob("*.dev200.csv")), metavar="CSV",
                   help=f"labelled CSVs whose texts make the stream (default: {SHARED_DATA}/*.dev200.csv)")
    p.add_argument("--texts", type=int, default=300, help="texts in the stream, repeats included (default 300)")
    p.add_argument("--repeats", type=float, default=0.3, help="share of the stream that repeats an earlier text")
    p.add_argument("--threads", type=int, default=1, help="n_threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of the repeats")
    p.add_argument("--chunk", type=int, default=32, help="texts an engine classifies before the other takes its turn")
    p.add_argument("--note", default="", help="said beside the model in the results (e.g. what the model stands in for)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    if not 0 <= a.repeats < 1 or a.texts < 2:
        raise SystemExit("--repeats must be in [0, 1) and --texts at least 2")
    texts, repeated = build_stream(a.data, a.texts, a.repeats, a.seed)
    runs = {}
    for mode in MODES:
        print(f"== {mode}: cache off and on, {a.chunk} texts each in turn", file=sys.stderr, flush=True)
        runs[mode] = run_pair(a.model, texts, repeated, mode, a.threads, a.chunk)
        runs[mode]["vs_off"] = compare(runs[mode]["on"], runs[mode]["off"])
    report = {"model": Path(a.model).name, "note": a.note, "threads": a.threads,
              "conditions": {**cpu_info(), "cpus_allowed": sorted(os.sched_getaffinity(0)),
                             "loadavg": list(os.getloadavg()), "git": git_commit(),
                             "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
              "command": "python -m allinone_gguf.measure.bench_cache " + " ".join(argv or sys.argv[1:]),
              "stream": {"texts": len(texts), "repeated": sum(repeated), "repeats": a.repeats, "seed": a.seed,
                         "distinct": len(set(texts)), "mean_chars": sum(map(len, texts)) / len(texts),
                         "data": [Path(d).name for d in a.data]},
              "runs": runs}
    md = render(report)
    print(md)
    path = write_result("cache", a.model, report, md, a.out)
    print(f"wrote {path} and {path.with_suffix('.md').name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
