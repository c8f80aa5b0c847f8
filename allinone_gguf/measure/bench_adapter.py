"""The sentiment adapter against the grammar path, side by side, in the same run (`make bench-adapter`).

    python -m allinone_gguf.measure.bench_adapter MODEL.gguf --data a.dev200.csv b.dev200.csv [--threads 2]

MODEL needs its adapter beside it (`make tune`: <family>.sentiment-lora.gguf). Each path runs in a fresh process
(so RSS is its own): the model with the adapter (`sentiment_adapter="auto"`) and without (`"off"`, the shipped prompt).
Per path: RSS after load and at the end, classify latency of single texts (the bench's short/medium/long
samples, p50/p95), and per data file accuracy, per-class recall, expected calibration error and the share of
labels an appended injection flips (evaluate.INJECTION, a template the training never used). Ratios (adapter /
grammar) are what compares across machines. Results: Markdown on stdout, JSON in bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from .machine import cpu_info, git_commit, write_result
from .bench_worker import latency_summary, memory_mb, sample_texts
from .evaluate import ece_of, flip_rate, predict
from ..scoring import NEGATIVE, POSITIVE, read_labeled_csv, score
from ..paths import RESULTS_DIR, ROOT

PATHS = {"grammar": "off", "adapter": "auto"}


def measure(model: str, path: str, data: list[str], threads: int, limit: int | None) -> dict:
    """In this process: every figure of one path."""
    from ..runtime import AllInOne
    before = memory_mb()["rss_mb"]
    start = time.perf_counter()
    # sentiment_cache=0: every text decoded, the warm-up's included when it comes round again
    bot = AllInOne(model, sentiment_adapter=PATHS[path], n_threads=threads, parallel=1, sentiment_cache=0)
    with bot:
        adapter = bot.sentiment_adapter
        out = {"path": path, "load_s": time.perf_counter() - start, "rss_before_mb": before,
               "rss_after_load_mb": memory_mb()["rss_mb"], "prompt": adapter.prompt if adapter else
               bot.settings.sentiment_prompt, "adapter_bytes": adapter.size if adapter else 0}
        texts = sample_texts()
        for kind in texts:
            bot.classify(texts[kind][-1])                     # warm-up, left out
        out["latency"] = {}
        for kind, items in texts.items():
            secs = []
            for text in items:
                t0 = time.perf_counter()
                s = bot.classify(text)
                secs.append(time.perf_counter() - t0)
            out["latency"][kind] = latency_summary(secs, items)
        out["source"] = s.source
        out["data"] = {}
        for name in data:
            rows = read_labeled_csv(name, limit or 0, empty="skip")
            t0 = time.perf_counter()
            found = bot.classify_many([t for _, t in rows])
            seconds = time.perf_counter() - t0
            ms = [x.margin for x in found]
            gold = [g for g, _ in rows]
            sc = score(gold, predict(ms, 0.0))
            flipped, n = flip_rate(bot, rows, ms, bot.settings.labels)
            out["data"][Path(name).name] = {
                "n": sc.n, "accuracy": sc.accuracy, "recall_pos": sc.recall[POSITIVE],
                "recall_neg": sc.recall[NEGATIVE], "ece": ece_of(gold, ms, 0.0), "flips": flipped / n,
                "confusion": sc.confusion, "texts_per_s": len(rows) / seconds}
        out["rss_end_mb"] = memory_mb()["rss_mb"]
        out["peak_rss_mb"] = memory_mb()["peak_rss_mb"]
    return out


def render(report: dict) -> str:
    g, a = report["paths"]["grammar"], report["paths"]["adapter"]
    m = report["machine"]
    lines = [f"Sentiment adapter vs grammar — {report['model']} — {report['date']}, {m.get('cpu', m)}, "
             f"{report['threads']} threads", "",
             "| file | path | accuracy | recall 正面 | recall 负面 | ECE | injection flips | texts/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name in g["data"]:
        for r in (g, a):
            d = r["data"][name]
            lines.append(f"| {name} | {r['path']} | {d['accuracy']:.3f} | {d['recall_pos']:.2f} | "
                         f"{d['recall_neg']:.2f} | {d['ece']:.3f} | {d['flips']:.1%} | {d['texts_per_s']:.1f} |")
    lines += ["", "| | grammar | adapter | adapter / grammar |", "|---|---|---|---|"]
    for kind in g["latency"]:
        x, y = g["latency"][kind]["p50_ms"], a["latency"][kind]["p50_ms"]
        lines.append(f"| classify p50, {kind} texts (ms) | {x:.0f} | {y:.0f} | {y / x:.2f} |")
    lines.append(f"| RSS after load (MB) | {g['rss_after_load_mb']:.0f} | {a['rss_after_load_mb']:.0f} | "
                 f"{a['rss_after_load_mb'] - g['rss_after_load_mb']:+.0f} MB |")
    lines.append(f"| RSS at the end (MB) | {g['rss_end_mb']:.0f} | {a['rss_end_mb']:.0f} | "
                 f"{a['rss_end_mb'] - g['rss_end_mb']:+.0f} MB |")
    lines.append(f"| adapter file (MB) | – | {a['adapter_bytes'] / 1e6:.1f} | |")
    lines.append(f"| prompt frame | {g['prompt']} | {a['prompt']} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.bench_adapter",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="GGUF model with <family>.sentiment-lora.gguf beside it")
    p.add_argument("--data", nargs="+", default=[], metavar="CSV", help="labelled files (label,text)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of each file")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--worker", choices=tuple(PATHS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.model, a.worker, a.data, a.threads, a.limit)))
        return 0
    from ..runtime.adapter import adapter_files, find_adapter
    if find_adapter(a.model, "auto") is None:
        print(f"error: no {adapter_files(a.model)[0].name} beside the model; `make tune` makes it", file=sys.stderr)
        return 2
    paths = {}
    for path in PATHS:
        print(f"== {path}", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "allinone_gguf.measure.bench_adapter", a.model, "--worker", path,
                            "--threads", str(a.threads), *(["--limit", str(a.limit)] if a.limit else []),
                            "--data", *a.data], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            print(f"error: the {path} run failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        paths[path] = json.loads(r.stdout.strip().splitlines()[-1])
    report = {"model": Path(a.model).name, "date": datetime.date.today().isoformat(),
              "machine": cpu_info(), "threads": a.threads, "commit": git_commit(),
              "command": "python -m allinone_gguf.measure.bench_adapter " + " ".join(argv or sys.argv[1:]),
              "paths": paths}
    md = render(report)
    print(md)
    path = write_result("adapter", a.model, report, md, a.out)
    print(f"wrote {path} and {path.with_suffix('.md').name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
