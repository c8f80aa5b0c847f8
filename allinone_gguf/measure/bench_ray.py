"""`make bench-ray`: texts/s of the classify command, local vs `--engine ray`, on the same texts and model.

    python -m allinone_gguf.measure.bench_ray --model ~/.cache/qwen-proxy/qwen2.5-coder-0.5b-instruct-Q4_K_M.gguf
    python -m allinone_gguf.measure.bench_ray --model X.gguf --texts 500 --data a.csv

Runs, one after another, each as a user runs it (`python -m allinone_gguf classify ...` in a process of its
own): local with 2 threads, Ray with 1 actor x 2 threads, Ray with 2 actors x 1 thread (a new one-machine Ray
cluster each, `--address local`). The texts are the `text` column of the --data CSVs, repeated until there are
--texts of them, written to a temporary CSV (nothing is copied into the project). Per run: the wall time of
the whole command (start-up, model loading, Ray's cluster and actors included), and the rate once started:
for local, classified texts over the classify loop's seconds (the command's own summary, model load left
out); for Ray, rows after the first block arrived over the seconds after it (the run's manifest.json). The
start-up is the rest of the wall time: wall - texts / rate. Ray's overhead is local's rate over Ray's. Output: a Markdown table on stdout and
bench/results/ray-<date>-<model>.json and .md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..faces.shards import MANIFEST
from ..paths import RESULTS_DIR, ROOT, SHARED_DATA
from .machine import cpu_info, write_result

DEFAULT_DATA = SHARED_DATA / "train" / "waimai_10k.train2000.csv"
CONFIGS = (("local, 2 threads", "local", 1, 2), ("ray, 1 actor x 2 threads", "ray", 1, 2),
           ("ray, 2 actors x 1 thread", "ray", 2, 1))
SUMMARY = re.compile(r"classified (\d+) texts in ([\d.]+) s")


def write_texts(sources: list[Path], n: int, path: Path) -> dict:
    """The first `n` texts of the sources (repeated when there are fewer) as a one-column CSV; their stats."""
    texts = []
    for src in sources:
        with open(src, encoding="utf-8-sig", newline="") as f:
            texts += [row["text"] for row in csv.DictReader(f) if row.get("text", "").strip()]
    if not texts:
        raise SystemExit(f"no texts in {', '.join(map(str, sources))}")
    chosen = [texts[i % len(texts)] for i in range(n)]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text"])
        w.writerows([t] for t in chosen)
    return {"texts": n, "distinct": len(set(chosen)), "avg_chars": round(sum(map(len, chosen)) / n, 1),
            "sources": [str(s) for s in sources]}


def run_one(engine: str, actors: int, threads: int, data: Path, model: Path, work: Path) -> dict:
    out = work / f"{engine}-{actors}x{threads}"
    # --sentiment-cache 0: the texts repeat when the sources hold fewer than --texts; every one is decoded
    cmd = [sys.executable, "-m", "allinone_gguf", "classify", str(data), "--model", str(model), "--threads",
           str(threads), "-q", "--overwrite", "--sentiment-cache", "0"]
    if engine == "ray":
        cmd += ["-o", str(out), "--engine", "ray", "--address", "local", "--actors", str(actors)]
    else:
        cmd += ["-o", str(out) + ".csv"]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    if engine == "ray":
        m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        texts, rate = m["rows_out"] - m["rows_error"], m["engine"]["texts_per_second_after_first_rows"]
    else:
        found = SUMMARY.search(r.stdout + r.stderr)
        if not found:
            raise SystemExit(f"no summary line in the local run's output:\n{r.stdout}")
        texts, rate = int(found[1]), int(found[1]) / float(found[2])
    startup = wall - texts / rate if rate else wall    # what is not classifying at the steady rate
    return {"engine": engine, "actors": actors, "threads": threads, "texts": texts, "wall_s": round(wall, 1),
            "texts_per_s_wall": round(texts / wall, 2), "texts_per_s_started": round(rate, 2),
            "startup_s": round(startup, 1)}


def table(runs: list[dict]) -> str:
    local = runs[0]
    lines = ["| run | wall s | texts/s (wall) | texts/s once started | start-up s | Ray overhead (local / this, "
             "once started) |", "|---|---:|---:|---:|---:|---:|"]
    for (name, *_), r in zip(CONFIGS, runs):
        ratio = local["texts_per_s_started"] / r["texts_per_s_started"] if r["texts_per_s_started"] else float("nan")
        lines.append(f"| {name} | {r['wall_s']} | {r['texts_per_s_wall']} | {r['texts_per_s_started']} | "
                     f"{r['startup_s']} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.bench_ray", description=__doc__.split("\n")[0])
    p.add_argument("--model", "-m", type=Path, required=True, help="GGUF model file")
    p.add_argument("--data", type=Path, action="append",
                   help=f"CSV with a text column, repeatable (default: {DEFAULT_DATA})")
    p.add_argument("--texts", type=int, default=2000, help="texts per run (default: 2000)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON report")
    args = p.parse_args(argv)
    report = {"conditions": {**cpu_info(), "host": socket.gethostname(), "model": str(args.model),
                             "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                             "ray": importlib.metadata.version("ray"),
                             "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
                             "loadavg_start": list(os.getloadavg())}}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        data = Path(tmp) / "texts.csv"
        report["data"] = write_texts(args.data or [DEFAULT_DATA], args.texts, data)
        runs = []
        for name, engine, actors, threads in CONFIGS:
            print(f"== {name}", file=sys.stderr, flush=True)
            runs.append(run_one(engine, actors, threads, data, args.model, Path(tmp)))
            print(f"   {runs[-1]}", file=sys.stderr, flush=True)
    report["runs"] = runs
    report["conditions"]["loadavg_end"] = list(os.getloadavg())
    md = table(runs)
    print(md)
    path = write_result("ray", args.model, {**report, "table": md}, md, args.out)
    print(f"report: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
