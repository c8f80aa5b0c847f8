"""`make bench`: speed, memory and accuracy of whole-product runs on this machine, one GGUF file per column.

    python -m allinone_gguf bench --model models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf \\
                                  --model models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q8_0.gguf
    python -m allinone_gguf bench --model X.gguf --data a.csv --data b.csv --limit 50
    python -m allinone_gguf bench --model X.gguf --baseline HF_CHECKOUT --baseline-python .venv-ref/bin/python

Per model file, in a process of its own (so peak RSS is that model's): load time, file size, peak RSS after
load and after a conversation; sentiment latency p50/p95 for short, medium and long messages, alone and
interleaved with chat turns; time to first token, generation and prompt tokens/s and the time of a full turn
(sentiment + a reply of at most 64 tokens); accuracy, per-class recall and invalid outputs on labeled CSVs.
Warm-up calls are left out. The conditions (CPU, cores, threads, context, versions, load average) are
recorded, because on a shared machine they change the numbers. Output: a Markdown table on stdout and
bench/results/bench-<date>-<model family>.json, .md and .png (measure/machine.py names every bench's results).
`--baseline` adds the seeds' transformers FP32 approach (measure/baseline.py, run by a Python that has torch and
transformers).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..faces.classify_common import UserError
from ..faces.flags import add_dataclass_arguments, add_settings_arguments, overrides
from .bench_worker import MAX_RUNS, REPLY_TOKENS
from .machine import cpu_info, git_commit, write_result
from ..scoring import normalise_gold, read_labeled_csv, score
from ..paths import REFERENCE_PYTHON, RESULTS_DIR, ROOT, SHARED_DATA

BENCH_SETTINGS = ("n_threads", "n_ctx", "sentiment_adapter", "sentiment_prompt")
BASELINE_MISSING = 3  # exit status of measure/baseline.py when torch or transformers is not installed


@dataclass(frozen=True)
class BenchSettings:
    """Defaults of the benchmark itself (the model's own knobs are in Settings)."""

    data_dir: Path = field(default=SHARED_DATA, metadata={
        "help": "every *.csv (header label,text) here is an accuracy data set when --data is not given"})
    limit: int = field(default=0, metadata={"help": "rows per data set; 0 = all"})
    runs: int = field(default=MAX_RUNS, metadata={
        "help": f"timed classifications per message length (short/medium/long; at most {MAX_RUNS}, one per "
                "sample text), after the warm-up"})
    turns: int = field(default=4, metadata={
        "help": "timed chat turns (classify, then reply) per message length, in one conversation each"})
    reply_tokens: int = field(default=REPLY_TOKENS, metadata={"help": "most new tokens of a timed reply"})
    seed: int = field(default=0, metadata={"help": "sampling seed of the timed replies"})
    out: Path = field(default=RESULTS_DIR, metadata={
        "help": "folder for bench-<date>-<model family>.json, .md and .png"})
    baseline_python: Path = field(default=REFERENCE_PYTHON, metadata={
        "help": "Python with torch + transformers for --baseline (`make reference-env` builds it)"})
    baseline_limit: int = field(default=25, metadata={
        "help": "rows per data set for the baseline (about 1.5 s per text); 0 = all"})
    baseline_runs: int = field(default=6, metadata={"help": "timed classifications per length for the baseline"})
    baseline_turns: int = field(default=2, metadata={"help": "timed chat turns per length for the baseline"})


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed, memory and accuracy of one or more GGUF files, side by side",
                       description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", type=Path, action="append", dest="models", metavar="GGUF",
                   help="a GGUF file to measure; repeat for a side-by-side comparison (e.g. Q4_K_M and Q8_0)")
    p.add_argument("--data", type=Path, action="append", metavar="CSV",
                   help="labeled CSV (header label,text); repeat for several; `--data none` skips accuracy")
    p.add_argument("--baseline", metavar="HF_CHECKOUT",
                   help="also measure the seeds' approach (transformers FP32) on this Hugging Face checkout "
                        "or hub id, with --baseline-python")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)  # one model's process
    add_dataclass_arguments(p, BenchSettings, [f.name for f in dataclasses.fields(BenchSettings)
                                               if f.name != "data_dir"], "benchmark settings")
    add_settings_arguments(p, BENCH_SETTINGS)
    p.set_defaults(func=run_bench)


# ---------------------------------------------------------------------------------------------- conditions

def conditions(settings) -> dict:
    return {**cpu_info(), "n_threads": settings.n_threads, "n_ctx": settings.n_ctx,
            "labels": settings.labels, "sentiment_prompt": settings.sentiment_prompt,
            "sentiment_adapter": settings.sentiment_adapter, "sentiment_cache": settings.sentiment_cache,
            "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
            "python": platform.python_version(), "os": platform.platform(), "host": socket.gethostname(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": git_commit(), "loadavg_start": list(os.getloadavg())}


def quant_of(path: Path) -> str:
    """The quantization as GGUF spells it (Q4_K_M, Q8_0, F16, ...), from the file's metadata or its name."""
    try:
        import gguf
        reader = gguf.GGUFReader(str(path))
        value = reader.fields["general.file_type"]
        return gguf.LlamaFileType(int(value.parts[value.data[0]][0])).name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001 - any unreadable metadata falls back to the name
        m = re.search(r"(I?Q\d_[A-Z0-9_]+|Q\d_\d|BF16|F16|F32)", path.name.upper())
        return m.group(1) if m else "?"


# ------------------------------------------------------------------------------------------------ running

def _datasets(args, bs: BenchSettings) -> dict[str, list[tuple[str, str]]]:
    """{name: [(gold 正面/负面, text), ...]}: every data set is read here, once, and handed to the measuring
    processes in their job (the baseline's Python has not even this package)."""
    if args.data and [str(d) for d in args.data] == ["none"]:
        return {}
    paths = args.data or sorted(bs.data_dir.glob("*.csv"))
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"data set(s) not found: {', '.join(missing)}")
    try:
        return {Path(p).name.removesuffix(".csv"): read_labeled_csv(p) for p in paths}
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _run_worker(cmd: list[str], job: dict, label: str) -> tuple[dict | None, int]:
    """Run one measuring process; (its result, exit status). Its progress goes to our stderr."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
        print(f"[{label}] measuring ...", file=sys.stderr, flush=True)
        status = subprocess.call([*cmd, str(job_path), str(result_path)], cwd=ROOT)
        if status == 0 and result_path.is_file():
            return json.loads(result_path.read_text(encoding="utf-8")), 0
        return None, status


def summarise_accuracy(raw: dict) -> dict:
    """{data set: n, accuracy, recall, invalid, confusion, texts_per_s} from gold and predicted lists."""
    out = {}
    for name, r in raw.items():
        s = score([normalise_gold(g) for g in r["gold"]], r["predicted"])
        out[name] = {"n": s.n, "accuracy": s.accuracy, "recall": s.recall, "invalid": s.invalid,
                     "confusion": s.confusion, "seconds": r["seconds"],
                     "texts_per_s": s.n / r["seconds"] if r["seconds"] > 0 else None}
    return out


def _model_entry(path: Path, result: dict | None, status: int) -> dict:
    entry = {"file": path.name, "path": str(path), "size_mb": path.stat().st_size / 2**20, "quant": quant_of(path)}
    if result is None:
        return {**entry, "error": f"the measuring process failed (exit status {status}); see the messages above"}
    result["accuracy"] = summarise_accuracy(result.get("accuracy", {}))
    return {**entry, **result}


def measure_models(models: list[Path], job: dict) -> list[dict]:
    entries = []
    for path in models:
        result, status = _run_worker([sys.executable, "-m", "allinone_gguf", "bench", "--worker"],
                                     {**job, "model": str(path)}, path.name)
        entries.append(_model_entry(path, result, status))
    return entries


def measure_baseline(source: str, python: Path, job: dict, bs: BenchSettings) -> dict | None:
    """The seeds' transformers FP32 approach, or None (with a message) when it cannot run here."""
    script = Path(__file__).with_name("baseline.py")
    if not script.is_file():
        print(f"skipped the transformers baseline: {script} not found", file=sys.stderr)
        return None
    if not Path(python).exists():
        print(f"skipped the transformers baseline: {python} not found; `make reference-env` builds an "
              "environment with torch and transformers", file=sys.stderr)
        return None
    job = {**job, "hf": source, "limit": bs.baseline_limit, "runs": min(bs.baseline_runs, job["runs"]),
           "turns": min(bs.baseline_turns, job["turns"])}
    result, status = _run_worker([str(python), str(script)], job, f"baseline {source}")
    if result is None:
        reason = ("torch or transformers is missing there" if status == BASELINE_MISSING
                  else f"it failed with exit status {status}")
        print(f"skipped the transformers baseline: {reason} ({python})", file=sys.stderr)
        return None
    result["accuracy"] = summarise_accuracy(result.get("accuracy", {}))
    return {"file": Path(source).name or source, "path": source, "quant": "FP32 (transformers)", **result}


def run_bench(args) -> int:
    if args.worker:
        from .bench_worker import main
        return main(*args.worker)
    from .bench_report import ratios, render_markdown, render_png
    from .bench_worker import sample_texts
    from ..runtime.config import Settings

    bs = BenchSettings(**overrides(args, [f.name for f in dataclasses.fields(BenchSettings)]))
    if not args.models:
        raise UserError("give at least one --model GGUF file (make bench MODEL=path/to/file.gguf)")
    missing = [str(m) for m in args.models if not m.is_file()]
    if missing:
        raise UserError(f"model file(s) not found: {', '.join(missing)}; run `make models` or pass a .gguf path")
    # The bench measures the model: the sentiment cache would answer its sample texts' repeats without a decode.
    given = {"sentiment_cache": 0, **overrides(args, BENCH_SETTINGS)}
    settings = Settings().replace(**given)
    datasets = _datasets(args, bs)
    if not datasets:
        print("no labeled data sets: accuracy is skipped (--data CSV, or put CSVs in "
              f"{bs.data_dir})", file=sys.stderr)
    texts = sample_texts()
    job = {"settings": given, "n_threads": settings.n_threads, "texts": texts, "runs": min(bs.runs, MAX_RUNS),
           "turns": bs.turns,
           "reply_tokens": bs.reply_tokens, "seed": bs.seed, "datasets": datasets, "limit": bs.limit}
    report = {"conditions": conditions(settings),
              "command": "python -m allinone_gguf bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                                                     else sys.argv[1:]),
              "texts": {k: {"n": len(v), "mean_chars": sum(map(len, v)) / len(v)} for k, v in texts.items()},
              "runs": job["runs"], "turns": job["turns"], "reply_tokens": bs.reply_tokens, "limit": bs.limit,
              "models": measure_models(args.models, job)}
    if args.baseline:
        baseline = measure_baseline(args.baseline, bs.baseline_python, job, bs)
        if baseline:
            report["baseline"] = baseline
    report["conditions"]["loadavg_end"] = list(os.getloadavg())
    report["ratios"] = ratios(report["models"])

    from ..runtime import model_family     # the files' common name: m for m-Q4_K_M.gguf and m-Q8_0.gguf
    markdown = render_markdown(report)
    path = write_result("bench", model_family(args.models[0]), report, markdown, bs.out)
    png = render_png(report, path.with_suffix(".png"))
    print(markdown)
    print(f"wrote {path}, {path.with_suffix('.md').name}" + (f", {png.name}" if png else
                                                             " (no PNG: Pillow is not installed)"))
    return 1 if any("error" in m for m in report["models"]) else 0
