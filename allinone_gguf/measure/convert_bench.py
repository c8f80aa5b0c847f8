"""Full-scale check of the model pipeline on a real 0.5B checkout: speed, memory and quantization quality.

    python -m allinone_gguf.measure.convert_bench CHECKOUT [--reference-python .venv-ref/bin/python]

CHECKOUT is a Hugging Face folder such as the one ../shared/tools/proxy-hf.sh builds. The script
1. converts it with our converter and (if a reference environment is given) with llama.cpp's
   convert_hf_to_gguf.py, each in its own process, timing it and reading its peak RSS, and checks the two
   F16 files are identical;
2. times `python -m convert all` (F16 + Q8_0 + Q4_K_M) from scratch;
3. feeds the same fixed Chinese and English text to the three files and reports, teacher-forced, how often
   the quantized file's most likely next token agrees with the F16 file's.
Prints a Markdown table and writes it, with the machine and the commit, to
bench/results/convert-<date>-<checkout>.json and .md. Figures depend on the machine: run it where you want to
know them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convert.defaults import gguf_name
from convert.pipeline import DEFAULT_TYPES
from convert.reference_files import reference_converter

from ..paths import REFERENCE_PYTHON, ROOT
from ..runtime.ceiling import teacher_forced_argmax
from .machine import cpu_info, git_commit, write_result

# Fixed texts for the agreement check, written for this purpose (not taken from any data set).
TEXTS = [
    "今天的实验终于成功了，我们整个小组都非常激动。过去三个月里，我们反复调整参数，失败了几十次，"
    "有时候真的想放弃。但是导师一直鼓励我们，说科研就是这样，一点一点往前走。昨天晚上，数据终于和理论预测吻合了，"
    "大家在实验室里欢呼起来。接下来我们要整理结果，写论文，还要准备下个月的学术报告。虽然很累，但心里特别踏实。"
    "外卖今天又迟到了一个小时，饭菜都凉了，客服的态度也很差，说会给我补偿，结果什么都没有。我以后不会再点这家店了。",
    "The hotel was close to the station and the staff were friendly, but the room was smaller than the photos "
    "suggested and the air conditioner made a loud noise all night. Breakfast was good, with fresh fruit and "
    "coffee. I would stay again for a short business trip, though not for a family holiday. Overall, the price "
    "was fair for what you get, and the location made up for most of the small problems we had during our stay.",
    "周末我和朋友去了城郊的一家农家乐。路不太好走，导航还把我们带错了两次，到的时候已经快中午了。老板很热情，"
    "端上来的土鸡汤特别香，青菜也是刚从地里摘的。下午我们去后山钓鱼，一条也没钓到，但是风景很美，空气也清新。"
    "唯一不满意的是房间有点潮，被子有一股霉味，晚上还有蚊子。总的来说还算值得，下次可能会换个季节再来。"
    "另外提醒一下，那里手机信号很差，想要上网的话最好提前下载好地图和音乐。",
    "I bought this laptop for university work. The screen is sharp and the keyboard is comfortable for long "
    "essays, yet the battery barely lasts four hours and the fan gets loud when I open more than a few browser "
    "tabs. Customer support replied quickly when a key stopped working and sent a replacement within a week. "
    "For the price it is a reasonable choice, but if you need to work away from a power socket all day, look "
    "for something with a bigger battery. I also wish the speakers were louder, because watching lectures "
    "without headphones is difficult in a noisy room.",
]


def run_measured(cmd: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process."""
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{p.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run the lighter command first
    return seconds, max(peak, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--reference-python", type=Path, default=REFERENCE_PYTHON)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = tmp / "ours-F16.gguf"
        t, rss = run_measured([py, "-m", "convert", "to-gguf", str(args.checkout), str(ours)], cwd=ROOT)
        rows.append(("our converter, F16", f"{t:.1f} s", f"{rss:.0f} MB"))
        if args.reference_python.is_file():
            script = reference_converter(ROOT / ".cache/vocab")
            ref = tmp / "ref-F16.gguf"
            t, rss = run_measured([str(args.reference_python), str(script), str(args.checkout), "--outtype", "f16",
                                   "--outfile", str(ref)], cwd=script.parent)
            rows.append(("llama.cpp convert_hf_to_gguf.py, F16", f"{t:.1f} s", f"{rss:.0f} MB"))
            from convert.compare import OUR_KEYS, differences
            diffs = differences(str(ours), str(ref), include_general=True, ours_only=OUR_KEYS)
            rows.append(("F16 files identical (tensors + metadata; our weights key aside)", "yes" if not diffs else f"NO: {diffs[:3]}", ""))
        ours.unlink()
        t, _ = run_measured([py, "-m", "convert", "all", str(args.checkout), "--out", str(tmp / "models")], cwd=ROOT)
        rows.append((f"python -m convert all ({' + '.join(DEFAULT_TYPES)})", f"{t:.1f} s", ""))
        folder = tmp / "models" / args.checkout.resolve().name
        files = {q: folder / gguf_name(folder.name, q) for q in DEFAULT_TYPES}
        for q, f in files.items():
            rows.append((f"size {q}", f"{f.stat().st_size / 1e6:.0f} MB", ""))
        agree = {q: [] for q in DEFAULT_TYPES if q != "F16"}
        for text in TEXTS:
            base = teacher_forced_argmax(files["F16"], text, args.threads)
            for q in agree:
                agree[q].append(teacher_forced_argmax(files[q], text, args.threads) == base)
        for q, parts in agree.items():
            allpos = np.concatenate(parts)
            zh = np.concatenate(parts[0::2]).mean()
            en = np.concatenate(parts[1::2]).mean()
            rows.append((f"top-1 agreement with F16, {q} (teacher-forced, {allpos.size} positions)",
                         f"{allpos.mean():.3f}", f"Chinese {zh:.3f}, English {en:.3f}"))
    machine = cpu_info()
    md = "\n".join([f"machine: {machine['cpu']}, {machine['logical_cpus']} CPUs; threads {args.threads}; checkout "
                    f"{args.checkout}", "", "| measure | value | note |", "|---|---|---|",
                    *(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows)])
    print("\n" + md)
    report = {"checkout": str(args.checkout), "threads": args.threads, "machine": machine, "commit": git_commit(),
              "date": datetime.date.today().isoformat(), "rows": [list(r) for r in rows]}
    print(f"\nwritten: {write_result('convert', args.checkout.resolve(), report, md)}")


if __name__ == "__main__":
    main()
