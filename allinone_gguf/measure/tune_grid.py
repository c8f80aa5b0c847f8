"""The sentiment adapter's learning curve: `tune` run once per setting, each into its own folder, and one table of
what each setting buys — dev accuracy per corpus, the smaller class recall, ECE, minutes, peak memory.

    make tune-grid      # the published grid, DEFAULT_GRID below, on the app's model
    python -m allinone_gguf.measure.tune_grid MODEL.gguf --data TRAIN.csv... --dev DEV.csv... \\
        --set texts=300 --set texts=600 --set texts=300,targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

Each --set is `tune` flags written as key=value pairs (TuneSettings' fields; a value may itself hold commas when
it is the last pair). A setting whose folder already holds a finished run is read, not trained again, so the grid
resumes after an interruption. The adapters land in <work>/<setting>/, never beside MODEL, so the shipped adapter
is left alone. The calibrations compared per row are all fitted on the held-back texts only (tune keeps every
held-back and dev margin in <work>/<setting>/work/margins.json): one temperature (what the runtime uses), and a
temperature per language (Chinese / English training files).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..paths import ROOT
from ..runtime import sigmoid
from ..scoring import ece_floor, expected_calibration_error
from ..tune.config import TuneSettings
from ..tune.run import TuneError, find_checkout, fit_temperature
from .machine import cpu_info, git_commit, write_result

FIELDS = {f.name: f for f in dataclasses.fields(TuneSettings)}
# `checkout=gguf` (not a tune flag): train on the checkout rebuilt from MODEL itself (dequantized) instead of --hf
KEYS = {*FIELDS, "checkout"}
DEFAULT_WORK = Path.home() / ".cache" / "allinone-gguf" / "tune-grid"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# The published grid (bench/results/tune-grid-*): 300 texts a file, then one knob at a time. Every row holds back
# 100 texts per training file, so the calibrations are fitted on 600 texts, and names the input length itself
# (max_tokens=0: the runtime's sentiment_tokens), so a row means the same whatever tune's defaults become.
DEFAULT_GRID = ("texts=300,held=100,max_tokens=0", "texts=300,held=100,max_tokens=64",
                "texts=300,held=100,checkout=gguf,max_tokens=0", "texts=600,held=100,max_tokens=64",
                f"texts=300,held=100,max_tokens=64,targets={ALL}", "texts=300,held=100,max_tokens=64,epochs=2")
# Settings that do not change what is trained (max_memory may lower the batch; that shows in the recorded batch).
UNCOMPARED = {"resume", "max_memory"}


def resolved(pairs: dict) -> dict:
    """Every tune setting a row trains with: tune's defaults with the row's pairs, typed as recorded in an adapter's
    metadata (max_tokens 0 and None both mean the runtime's sentiment_tokens).

        >>> resolved({"texts": "300", "max_tokens": "0"})["max_tokens"], resolved({})["texts"] > 0
        (None, True)
    """
    out = {name: f.default for name, f in FIELDS.items() if name not in UNCOMPARED}
    for k, v in pairs.items():
        if k in out:
            kind = str(FIELDS[k].type)          # the dataclass's annotation, e.g. "int | None"
            out[k] = (v.lower() in ("1", "true", "yes") if kind.startswith("bool") else int(v) if kind.startswith("int")
                      else float(v) if kind.startswith("float") else v)
    out["max_tokens"] = out["max_tokens"] or None
    return out


def stale(meta: dict, pairs: dict) -> list[str]:
    """What a finished run's recorded settings say differently from what the row asks now ('k: was -> now')."""
    recorded = dict(meta["training"]["settings"])
    recorded["max_tokens"] = recorded.get("max_tokens") or None
    return [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in resolved(pairs).items()
            if k in recorded and recorded[k] != v and not (isinstance(v, float) and abs(recorded[k] - v) < 1e-12)]


def parse_setting(text: str) -> dict:
    """'texts=300,targets=q_proj,k_proj' -> {'texts': '300', 'targets': 'q_proj,k_proj'}: a comma starts a new
    pair only when what follows it is `field=`.

        >>> parse_setting("texts=300,epochs=2")
        {'texts': '300', 'epochs': '2'}
        >>> parse_setting("texts=300,targets=q_proj,v_proj")
        {'texts': '300', 'targets': 'q_proj,v_proj'}
    """
    pairs: dict[str, str] = {}
    key = None
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if eq and name.strip() in KEYS:
            key = name.strip()
            pairs[key] = value.strip()
        elif key is not None:
            pairs[key] += "," + part.strip()
        else:
            raise ValueError(f"--set {text!r}: {part!r} is not field=value (fields: {', '.join(KEYS)})")
    return pairs


def slug(pairs: dict) -> str:
    """A folder name for a setting: 'texts300-epochs2'; 'default' for no pairs."""
    short = {"q_proj,k_proj,v_proj,o_proj": "attn", ALL: "all"}
    return "-".join(f"{k.replace('_', '')}{short.get(v, v.replace(',', '+'))}" for k, v in pairs.items()) or "default"


def language(source: str) -> str:
    """A training or dev file's language, by its name: the English sets are SST-2's."""
    return "en" if source.startswith("sst2") else "zh"


def calibrations(margins: dict) -> dict:
    """Per calibration fitted on the held-back margins: its parameters, the ECE on each dev file and on all of them
    pooled, and beside each the ECE a perfectly calibrated model would show there (scoring.ece_floor: on 200 texts
    about 0.05, so a per-file ECE near it is as good as calibration gets on that many texts)."""
    held = margins["held"]
    one = fit_temperature([m for _, _, m in held], [y for _, y, _ in held])
    per_lang = {}
    for lang in ("zh", "en"):
        rows = [(y, m) for s, y, m in held if language(s) == lang]
        per_lang[lang] = fit_temperature([m for _, m in rows], [y for y, _ in rows]) if rows else one
    out = {"one temperature": {"temperature": one}, "per language": {"temperature": per_lang}}
    for name, fitted in out.items():
        ece, floor, gold, probs = {}, {}, [], []
        for dev, rows in margins["dev"].items():
            t = fitted["temperature"] if name == "one temperature" else fitted["temperature"][language(dev)]
            p = [sigmoid(m / t) for _, m in rows]
            ece[dev] = expected_calibration_error([y == 1 for y, _ in rows], p)
            floor[dev] = ece_floor(p)[0]
            gold += [y == 1 for y, _ in rows]
            probs += p
        fitted.update(ece=ece, floor=floor, pooled_ece=expected_calibration_error(gold, probs),
                      pooled_floor=ece_floor(probs)[0])
    return out


def run_setting(model: Path, pairs: dict, args, folder: Path) -> dict:
    """Train one setting (unless its folder holds a finished run) and read back its metadata and margins."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / model.name
    if not link.exists():
        link.symlink_to(model.resolve())
    metas = list(folder.glob("*.sentiment-lora.json"))
    margins_file = folder / "work" / "margins.json"
    if metas and (changed := stale(json.loads(metas[0].read_text(encoding="utf-8")), pairs)):
        raise SystemExit(f"tune_grid: {folder} holds a run of other settings ({'; '.join(changed)}): tune's "
                         "defaults changed since; name the setting in the row, or move the folder away to train it again")
    if not (metas and margins_file.is_file() and "dev" in json.loads(metas[0].read_text(encoding="utf-8"))):
        flags = dict(pairs)
        source = flags.pop("checkout", "hf")
        if source not in ("hf", "gguf"):
            raise SystemExit(f"tune_grid: checkout={source}: hf (the original checkout) or gguf (rebuilt from MODEL)")
        # no --hf and no manifest beside the link: tune rebuilds a checkout from the GGUF (cached beside it)
        cmd = [sys.executable, "-m", "allinone_gguf", "tune", str(link), *(["--hf", args.hf] * (source == "hf")),
               "--work", str(folder / "work"), "--data", *args.data, "--dev", *args.dev]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        for k, v in flags.items():
            if FIELDS[k].type in (bool, "bool"):
                cmd.append(f"--{k.replace('_', '-')}" if v.lower() in ("1", "true", "yes") else
                           f"--no-{k.replace('_', '-')}")
            else:
                cmd += [f"--{k.replace('_', '-')}", v]
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc != 0:
            raise SystemExit(f"tune_grid: {slug(pairs)} failed (exit status {rc})")
        print(f"{slug(pairs)}: {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        metas = list(folder.glob("*.sentiment-lora.json"))
    meta = json.loads(metas[0].read_text(encoding="utf-8"))
    return {"setting": pairs, "slug": slug(pairs), "meta": meta,
            "calibration": calibrations(json.loads(margins_file.read_text(encoding="utf-8")))}


def table(rows: list[dict]) -> str:
    devs = sorted({d for r in rows for d in r["meta"]["dev"]})
    short = [d.split(".")[0].replace("chnsenticorp_htl_all", "htl").replace("online_shopping_10_cats", "shopping")
             .replace("douban_book_review", "douban").replace("_10k", "").replace("sst2_glue_dev", "sst2") for d in devs]
    head = ("| setting | " + " | ".join(short) + " | min recall | ECE per file, max (floor) | ECE pooled (floor) "
            "| same, T per language | steps | s/step | minutes | trainer peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m, t = r["meta"], r["meta"]["training"]
        recall = min(v for d in m["dev"].values() for v in d["recall"].values() if v is not None)
        one, per = r["calibration"]["one temperature"], r["calibration"]["per language"]
        worst = max(one["ece"], key=one["ece"].get)
        lines.append(
            f"| {r['slug']} | " + " | ".join(f"{m['dev'][d]['accuracy']:.3f}" for d in devs)
            + f" | {recall:.3f} | {one['ece'][worst]:.3f} ({one['floor'][worst]:.3f}) | {one['pooled_ece']:.3f} "
            f"({one['pooled_floor']:.3f}) | {per['pooled_ece']:.3f} | {t['steps']} | {t.get('seconds_per_step') or 0:.2f} "
            f"| {m['minutes']} | {(t.get('peak_rss_mb') or 0) / 1024:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.tune_grid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, metavar="MODEL.gguf")
    p.add_argument("--hf", metavar="DIR", help="the checkout MODEL came from (default: its manifest, as tune finds it)")
    p.add_argument("--data", nargs="+", required=True, metavar="CSV")
    p.add_argument("--dev", nargs="+", required=True, metavar="CSV")
    p.add_argument("--set", action="append", default=[], metavar="K=V[,K=V]", dest="sets",
                   help="one setting of the grid (repeat; `default`: tune's defaults); none: the published grid")
    p.add_argument("--threads", type=int, help="threads each tune uses (default: tune's)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"folder of the runs (default: {DEFAULT_WORK})")
    args = p.parse_args(argv)
    try:
        settings = [{} if s == "default" else parse_setting(s) for s in args.sets or DEFAULT_GRID]
    except ValueError as e:
        p.error(str(e))
    try:
        args.hf = str(find_checkout(args.model, args.hf))
    except TuneError as e:
        p.error(str(e))
    rows = []
    for pairs in settings:
        rows.append(run_setting(args.model, pairs, args, args.work / args.model.name.removesuffix(".gguf") / slug(pairs)))
        report = {"machine": cpu_info(), "commit": git_commit(), "threads": args.threads or min(4, os.cpu_count() or 1),
                  "rows": [{k: v for k, v in r.items()} for r in rows]}
        md = (f"# Sentiment adapter: learning curve on {args.model.name}\n\n"
              f"{time.strftime('%Y-%m-%d')}, {cpu_info()['cpu']}, {report['threads']} thread(s); "
              f"`python -m allinone_gguf.measure.tune_grid` (commit {report['commit']}).\n\n" + table(rows) + "\n")
        path = write_result("tune-grid", args.model, report, md)
        print(md, flush=True)
    print(f"wrote {path} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
