"""`python -m allinone_gguf tune MODEL.gguf --data CSV...`: fine-tune, convert and check a sentiment LoRA.

Steps (this process never imports torch):
1. the training texts (data.py) are put in the runtime's own sentiment frame by `AllInOne.sentiment_inputs`
   and written as token ids (inputs.jsonl), so training sees exactly what classify decodes;
2. train_lora.py trains a PEFT LoRA on the Hugging Face checkout the GGUF came from, in .venv-tune (torch);
3. our torch-free converter (convert/lora_to_gguf.py) writes <family>.sentiment-lora.gguf beside the model
   (the model's name without its -<quant> suffix: one adapter for every quantization of the same weights);
4. the runtime, with the adapter, reads the held-back texts: the confidence's temperature is fitted on them;
5. the dev files are classified with the adapter; everything lands in <family>.sentiment-lora.json, with the
   weights' identity (runtime/adapter.py `weights_identity`) the runtime checks. (The
   grammar path beside it: `make bench-adapter` or `evaluate --compare`.)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from convert.defaults import MANIFEST

from ..paths import TUNE_PYTHON
from ..runtime.adapter import adapter_files, file_sha256, weights_identity, write_metadata
from ..runtime.prompts import LABEL_SETS, SENTIMENT_PROMPTS
from ..scoring import NEGATIVE, POSITIVE
from ..scoring import score as score_labels
from .config import TuneSettings
from .data import build_examples, read_labelled
from .memory import checkout_shape, cpu_has_bf16, estimate_peak_gb, padded_length, pick_precision_and_batch

TRAINER = Path(__file__).with_name("train_lora.py")
PHASES = {"inputs": "texts to token ids", "trainer": "training (start, steps, held-back checks)",
          "convert": "conversion", "held_back": "held-back texts (temperature)",
          "dev": "dev files"}


class TuneError(RuntimeError):
    """A clear, one-line reason the tune command cannot go on."""


def tune_python() -> Path:
    """The Python of the tuning environment (`make tune-env`), or ALLINONE_TUNE_PYTHON."""
    if not TUNE_PYTHON.exists():
        raise TuneError(f"{TUNE_PYTHON}: no tuning environment; `make tune-env` builds it (torch + peft, ~1 GB), "
                        "or set ALLINONE_TUNE_PYTHON")
    return TUNE_PYTHON


def find_checkout(model: Path, hf: str | None, log=print) -> Path:
    """The Hugging Face checkout `model` was converted from: --hf, else the manifest beside the model, else one
    rebuilt from the GGUF itself (rebuilt_checkout)."""
    from convert.download import DownloadError, resolve
    if hf is None:
        manifest = model.parent / MANIFEST
        if not manifest.is_file():
            return rebuilt_checkout(model, log)
        hf = json.loads(manifest.read_text(encoding="utf-8"))["source"]
    try:
        return resolve(hf, progress=True).checkout
    except DownloadError as e:
        raise TuneError(str(e)) from None


def rebuilt_checkout(model: Path, log=print) -> Path:
    """A Hugging Face checkout rebuilt from the GGUF (convert/gguf_to_hf.py) into `<source>-hf/` beside it, once:
    from the family's F16 file when it holds the same weights (`<family>-F16.gguf`), else from `model` itself
    (then the training sees the quantized weights the adapter will run with). Reused while the source file is
    unchanged (size and mtime in the folder's gguf_source.json)."""
    import shutil

    from convert.gguf_to_hf import SOURCE_FILE, convert_gguf_to_hf
    from convert.safetensors_np import CheckpointError
    from ..runtime.adapter import model_family
    source = model.with_name(model_family(model) + "-F16.gguf")
    if not source.is_file() or source == model or weights_identity(source) != weights_identity(model):
        source = model
    cache = source.with_name(source.name.removesuffix(".gguf") + "-hf")
    stat = source.stat()
    marker = cache / SOURCE_FILE
    if marker.is_file():
        made = json.loads(marker.read_text(encoding="utf-8"))
        if (made.get("gguf"), made.get("bytes"), made.get("mtime_ns")) == (source.name, stat.st_size, stat.st_mtime_ns):
            log(f"no {MANIFEST} beside {model.name} and no --hf: training on {cache}, rebuilt from {source.name} "
                "before")
            return cache
        shutil.rmtree(cache)       # rebuilt by us from an older file of that name
    elif cache.exists():
        raise TuneError(f"{cache}: in the way of the checkout rebuilt from {source.name} (not made by us); move it, "
                        "or pass --hf DIR, the Hugging Face checkout the model was converted from")
    log(f"no {MANIFEST} beside {model.name} and no --hf: rebuilding a Hugging Face checkout from {source.name} "
        f"into {cache} (dequantized, once; --hf DIR uses the original checkout instead)")
    try:
        return convert_gguf_to_hf(source, cache)
    except (CheckpointError, ValueError) as e:
        raise TuneError(f"{e}; pass --hf DIR, the Hugging Face checkout the model was converted from") from None


def fit_temperature(margins: list[float], labels: list[int]) -> float:
    """The T > 0 minimising the log loss of sigmoid(margin / T) on (margin, label) pairs (golden-section search
    over log T)."""
    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        total = 0.0
        for m, y in zip(margins, labels):
            z = (m if y == 1 else -m) / t
            total += math.log1p(math.exp(-z)) if z > -30 else -z
        return total

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return round(math.exp((lo + hi) / 2), 4)


def score(bot, rows: list[tuple[int, str]], labels: str) -> dict:
    """Accuracy and per-class recall of `bot` on (label, text) rows (1 = positive), counted by scoring.score, with
    the recall keyed by the label set's own words, and the margins (for the temperature fit)."""
    found = bot.classify_many([t for _, t in rows], labels)
    s = score_labels([POSITIVE if y else NEGATIVE for y, _ in rows],
                     [POSITIVE if f.is_positive else NEGATIVE for f in found])
    recall = {name: None if math.isnan(s.recall[c]) else round(s.recall[c], 4)
              for name, c in zip(LABEL_SETS[labels], (POSITIVE, NEGATIVE))}
    return {"n": s.n, "accuracy": round(s.accuracy, 4), "recall": recall,
            "margins": [f.margin for f in found], "right": [f.is_positive == bool(y) for (y, _), f in zip(rows, found)],
            "source": found[0].source if found else None}


def accuracy_by_file(sources: list[str], right: list[bool]) -> dict[str, float]:
    """Share right per training file, in the files' order (the held-back texts of each file)."""
    by = {}
    for name, r in zip(sources, right):
        by.setdefault(name, []).append(r)
    return {name: round(sum(rs) / len(rs), 4) for name, rs in by.items()}


def no_bf16_hint(s: TuneSettings) -> str:
    """What the tuner says on a CPU without bf16 arithmetic: why the steps are slow, and the faster settings that
    this run does not use already (docs/adapter.md: CPUs without bf16 arithmetic)."""
    faster = []
    if s.texts > 150:
        faster.append(f"fewer --texts (now {s.texts} a file) take proportionally fewer steps, for some accuracy "
                      "(--texts 150 --lr 6e-4: a quarter of the default's steps, within 3.5 points of its dev "
                      "accuracy on the 0.5B stand-in)")
    if s.checkpointing and s.max_memory is None:
        faster.append("--no-checkpointing is faster for more memory")
    return ("without bf16 arithmetic a training step is all fp32 matrix products, several times as long as on a "
            "CPU with AVX512-BF16 or AMX (the bar's estimate tells after a few steps)"
            + (": " + "; ".join(faster) + " (tune --help)" if faster else "")
            + ". docs/adapter.md: CPUs without bf16 arithmetic")


def run_trainer(cmd: list[str]) -> int:
    """Run the trainer in the foreground; a Ctrl-C reaches it too (same process group) and it saves a checkpoint
    and the best adapter so far, which this process then waits for instead of dying. A SIGTERM sent to this
    process is passed on to the trainer, which takes it like a Ctrl-C (and takes a second one as the same)."""
    proc = subprocess.Popen(cmd)

    def on_sigterm(signum, frame):
        print("SIGTERM: waiting for the trainer to save a checkpoint…", file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGTERM)
    before = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                print("waiting for the trainer to save the best checkpoint…", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, before)


def peak_rss_gb() -> float:
    """The largest resident set of this process and of its finished children (the trainer), in GiB (2**30 bytes)."""
    kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(kb / 1024 ** 2, 2)


def tune(model: str | Path, data: list[str], *, hf: str | None = None, dev: list[str] = (),
         settings: TuneSettings = TuneSettings(), threads: int | None = None, work: str | Path | None = None,
         log=print) -> dict:
    """Train, convert and check a sentiment adapter for `model`; returns the metadata written beside it."""
    from convert.lora_to_gguf import convert_lora_to_gguf
    from ..runtime import AllInOne

    s = settings
    model = Path(model)
    if not model.is_file():
        raise TuneError(f"{model}: no such model file")
    if s.prompt not in SENTIMENT_PROMPTS or s.labels not in LABEL_SETS:
        raise TuneError(f"prompt must be one of {sorted(SENTIMENT_PROMPTS)} and labels one of {sorted(LABEL_SETS)}")
    files = [Path(d) for d in data]
    for f in files + [Path(d) for d in dev]:
        if not f.is_file():
            raise TuneError(f"{f}: no such file")
    python = tune_python()
    checkout = find_checkout(model, hf, log)
    out_gguf, out_meta = adapter_files(model)
    work = Path(work) if work else model.with_name(out_gguf.name[:-5] + "-work")
    work.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    started = time.perf_counter()
    phases = {}         # wall seconds of each step, in the metadata and the last lines printed

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 1)
        return now

    try:
        examples, record = build_examples(files, texts=s.texts, held=s.held, inject_share=s.inject, seed=s.seed)
    except ValueError as e:
        raise TuneError(str(e)) from None
    if not any(e.split == "train" for e in examples):
        raise TuneError("no training texts: give --data files with label,text rows and --texts > 0")
    log(f"{sum(e.split == 'train' for e in examples)} training examples "
        f"({sum(e.injected for e in examples)} with injected instructions), "
        f"{sum(e.split == 'held' for e in examples)} held back, from {len(files)} file(s)")

    # 1. token ids in the runtime's frame (the model file's tokenizer: the same ids classify decodes)
    cut = {"sentiment_tokens": s.max_tokens} if s.max_tokens else {}
    with AllInOne(model, sentiment_adapter="off", sentiment_prompt=s.prompt, labels=s.labels,
                  n_threads=threads, parallel=1, **cut) as bot:
        ids, label_ids, digest = bot.sentiment_inputs([e.text for e in examples], s.labels)
        n_prefix = len(os.path.commonprefix(ids))
        prefix = ids[0][:n_prefix]
    inputs = work / "inputs.jsonl"
    with inputs.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"prefix": prefix, "label_ids": [list(label_ids[0]), list(label_ids[1])]}) + "\n")
        for e, t in zip(examples, ids):
            f.write(json.dumps({"rest": t[n_prefix:], "label": e.label, "split": e.split}) + "\n")
    mark = lap("inputs", started)

    # 2. training, in the tuning environment, at the largest batch that fits --max-memory
    bf16_arithmetic = cpu_has_bf16()
    shape = checkout_shape(checkout)
    if s.pad_to < 1:
        raise TuneError(f"pad_to must be 1 or more, not {s.pad_to}")
    longest = padded_length(max(len(t) for t in ids) - n_prefix, s.pad_to)
    if s.layers < 0:
        raise TuneError(f"layers must be 0 (all) or more, not {s.layers}")
    sizes = dict(prefix=n_prefix, longest=longest, checkpointing=s.checkpointing, adapted=s.layers,
                 bf16_arithmetic=bf16_arithmetic)
    try:
        base_dtype, batch = pick_precision_and_batch(shape, s.max_memory, base_dtype=s.base_dtype, batch=s.batch,
                                                     **sizes)
    except ValueError as e:
        raise TuneError(str(e)) from None
    sizes["base_dtype"] = base_dtype
    why_dtype = ""
    if not bf16_arithmetic and base_dtype == "bf16":
        why_dtype = ", multiplied in fp32: this CPU has no bf16 arithmetic" + (
            f"; fp32 weights would not fit --max-memory {s.max_memory:g}" if s.base_dtype == "auto" else "")
    elif not bf16_arithmetic and s.base_dtype == "auto":
        why_dtype = ": this CPU has no bf16 arithmetic"
    log(f"batch {batch}: about {estimate_peak_gb(shape, batch=batch, **sizes):.1f} GiB at the longest input "
        f"({sizes['prefix'] + sizes['longest']} tokens, {base_dtype} base weights{why_dtype}; estimate)")
    if not bf16_arithmetic:
        log(no_bf16_hint(s))
    peft_dir = work / "peft"
    cmd = [str(python), str(TRAINER), "--checkout", str(checkout), "--inputs", str(inputs), "--out", str(peft_dir),
           "--rank", str(s.rank), "--alpha", str(s.alpha), "--targets", s.targets, "--epochs", str(s.epochs),
           "--lr", str(s.lr), "--batch", str(batch), "--seed", str(s.seed), "--threads", str(threads),
           "--pad-to", str(s.pad_to), "--layers", str(s.layers), "--base-dtype", base_dtype,
           "--checkpointing" if s.checkpointing else "--no-checkpointing"]
    if s.resume:
        cmd.append("--resume")
    log(f"training on {checkout} ({python})")
    rc = run_trainer(cmd)
    mark = lap("trainer", mark)
    if rc not in (0, 130) or not (peft_dir / "adapter_model.safetensors").is_file():
        raise TuneError(f"training failed (exit status {rc}); its messages are above")
    train_log = json.loads((peft_dir / "train_log.json").read_text(encoding="utf-8"))
    if train_log["interrupted"]:
        log(f"training stopped at step {train_log['steps']} of {train_log['steps_planned']}: going on with the best "
            "checkpoint so far; the same command with --resume continues the training")

    # 3. conversion (torch-free, byte-identical to llama.cpp's converter)
    convert_lora_to_gguf(peft_dir, checkout, out_gguf, "F16")
    mark = lap("convert", mark)
    meta = {
        "base_weights": weights_identity(model), "base_file": model.name, "base_sha256": file_sha256(model),
        "checkout": str(checkout),
        "labels": s.labels, "label_set": list(LABEL_SETS[s.labels]), "prompt": s.prompt, "frame_sha256": digest,
        "temperature": 1.0, "adapter_bytes": out_gguf.stat().st_size, "adapter_sha256": file_sha256(out_gguf),
        "training": {"settings": dataclasses.asdict(s), "files": record, "seconds": train_log["seconds"],
                     "steps": train_log["steps"], "interrupted": train_log["interrupted"], "batch": batch,
                     "peak_rss_mb": train_log.get("peak_rss_mb"),
                     "seconds_per_step": train_log.get("seconds_per_step"),
                     "held_back": train_log.get("best")},
    }
    write_metadata(out_meta, meta)

    # 4. temperature, fitted on the held-back texts read by the runtime with the adapter
    held_examples = [e for e in examples if e.split == "held"]
    held = [(e.label, e.text) for e in held_examples]
    dev_results = {}
    # the raw margins (before any temperature) of every held-back and dev text, kept in the work folder so that
    # calibrations can be compared without reading the texts again (measure/tune_grid.py)
    margins = {"held": [], "dev": {}}
    with AllInOne(model, sentiment_adapter=str(out_gguf), labels=s.labels, n_threads=threads, parallel=1) as bot:
        if held:
            found = score(bot, held, s.labels)
            meta["temperature"] = fit_temperature(found["margins"], [y for y, _ in held])
            margins["held"] = [[e.source, e.label, m] for e, m in zip(held_examples, found["margins"])]
            meta["held_back_accuracy"] = accuracy_by_file([e.source for e in held_examples], found["right"])
            log(f"held-back texts with the adapter: accuracy {found['accuracy']:.3f}; temperature "
                f"{meta['temperature']}")
            counts = Counter(e.source for e in held_examples)
            for name, acc in meta["held_back_accuracy"].items():
                log(f"  {name}: {acc:.3f} on {counts[name]} texts it never trained on")
        mark = lap("held_back", mark)
        for d in dev:
            rows = read_labelled(Path(d))
            found = score(bot, rows, s.labels)
            margins["dev"][Path(d).name] = [[y, m] for (y, _), m in zip(rows, found["margins"])]
            dev_results[Path(d).name] = {k: v for k, v in found.items() if k not in ("margins", "right")}
        lap("dev", mark)
    (work / "margins.json").write_text(json.dumps(margins) + "\n", encoding="utf-8")
    for name, r in dev_results.items():
        log(f"dev {name}: accuracy {r['accuracy']:.3f} with the adapter (recall {r['recall']})")
    meta["dev"] = dev_results
    meta["minutes"] = round((time.perf_counter() - started) / 60, 1)
    meta["phase_seconds"] = phases
    write_metadata(out_meta, meta)
    log(f"wrote {out_gguf} ({out_gguf.stat().st_size / 1e6:.1f} MB) and {out_meta.name} in {meta['minutes']} min")
    log("time: " + ", ".join(f"{PHASES[k]} {v / 60:.1f} min" for k, v in phases.items()))
    log(f"peak memory {peak_rss_gb():.2f} GiB (ru_maxrss: the trainer or this process, whichever is larger)")
    return meta
