"""The accuracy script (`python -m allinone_gguf.evaluate`) on the tiny model: its figures match classify()."""
from __future__ import annotations

import re
import subprocess
import sys

from allinone_gguf import AllInOne

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
TEXTS = [("1", "味道不错，送得也快。"), ("0", "太难吃了，再也不点了。"), ("1", "Great value, would buy again."),
         ("0", "服务态度差"), ("1", "房间很干净"), ("0", "等了两个小时")]


def test_evaluate_reports_the_accuracy_classify_gives(tiny_models, tmp_path):
    model = tiny_models["Q8_0"]
    data = tmp_path / "small.csv"
    data.write_text("label,text\n" + "".join(f'{g},"{t}"\n' for g, t in TEXTS), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "allinone_gguf.evaluate", str(model), str(data), "--sweep",
                        "--inject", "--n-threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with AllInOne(model, n_threads=1) as bot:
        right = sum((bot.classify(t).label == "正面") == (g == "1") for g, t in TEXTS)
    m = re.search(r"small\.csv: n=(\d+) accuracy=([\d.]+)", r.stdout)
    assert m and int(m.group(1)) == len(TEXTS), r.stdout
    assert abs(float(m.group(2)) - right / len(TEXTS)) < 1e-3, r.stdout
    flips = re.search(r"prompt injection flipped (\d+) of (\d+) labels", r.stdout)
    assert flips and int(flips.group(2)) == len(TEXTS) and 0 <= int(flips.group(1)) <= len(TEXTS), r.stdout
    assert "neutral band" in r.stdout and "| small.csv |" in r.stdout


def test_evaluate_names_a_missing_model(tmp_path):
    data = tmp_path / "small.csv"
    data.write_text("label,text\n1,好\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "allinone_gguf.evaluate", str(tmp_path / "nope.gguf"), str(data)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.gguf" in r.stderr and "Traceback" not in r.stderr
