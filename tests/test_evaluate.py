"""The accuracy script (`python -m allinone_gguf.evaluate`): exact figures on a fake model whose margins the test
controls, and on the tiny model the same figures as classify() gives, text by text."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from allinone_gguf.scoring import reliability
from conftest import FakeRuntime

import allinone_gguf.runtime
from allinone_gguf import AllInOne
from allinone_gguf.measure import evaluate
from allinone_gguf.runtime.sentiment import sentiment_from_margin

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [("1", "味道不错，送得也快。"), ("0", "太难吃了，再也不点了。"), ("1", "Great value, would buy again."),
         ("0", "服务态度差"), ("1", "房间很干净"), ("0", "等了两个小时")]


def write_set(path: Path, rows) -> Path:
    path.write_text("label,text\n" + "".join(f'{g},"{t}"\n' for g, t in rows), encoding="utf-8")
    return path


class FakeBot(FakeRuntime):
    """Margin +2 for texts with 好, -1 otherwise; an appended injection wins only where the text has a "!"."""

    def __init__(self, path, **settings):
        self.settings = allinone_gguf.runtime.Settings(**settings)

    def label_set(self, labels=None):
        return ("正面", "负面")

    def classify(self, text, labels=None):
        asked = re.search("(正面|负面)", text)           # the label an injection asks for (no text here names one)
        if asked and "!" in text:
            margin = 3.0 if asked.group(1) == "正面" else -3.0
        else:
            margin = 2.0 if "好" in text else -1.0
        return sentiment_from_margin(margin + self.settings.sentiment_bias, ("正面", "负面"))

    def classify_many(self, texts, labels=None):
        return [self.classify(t, labels) for t in texts]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_inject_all_measures_each_held_out_wording_and_their_total(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(allinone_gguf.runtime, "AllInOne", FakeBot)
    rows = [("1", "很好!"), ("1", "好"), ("1", "一般!"), ("0", "差"), ("0", "不好"), ("0", "太差!")]
    data = write_set(tmp_path / "fake.csv", rows)
    assert evaluate.main([str(tmp_path / "x.gguf"), str(data), "--inject", "all"]) == 0
    out = capsys.readouterr().out
    wordings = evaluate.HELD_OUT_INJECTIONS["zh"]
    assert len(wordings) >= 4 and {where for where, _ in wordings} == {"before", "after"}
    # none is a wording the training used
    from allinone_gguf.tune.data import TRAIN_INJECTIONS
    assert not {t for _, t in wordings} & {t for ws in TRAIN_INJECTIONS.values() for _, t in ws}
    for where, template in wordings:                 # each wins on the three texts with "!"
        assert f"  injection {where} {template!r}: flipped 3 of 6 (50.0%)" in out
    assert f"prompt injection flipped {3 * len(wordings)} of {6 * len(wordings)} labels (50.0%)" in out


def test_evaluate_figures_on_controlled_margins(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(allinone_gguf.runtime, "AllInOne", FakeBot)
    rows = [("1", "很好!"), ("1", "好"), ("1", "一般!"), ("0", "差"), ("0", "不好"), ("0", "太差!"), ("0", "  ")]
    data = write_set(tmp_path / "fake.csv", rows)
    png = tmp_path / "reliability.png"
    assert evaluate.main([str(tmp_path / "x.gguf"), str(data), "--sweep", "--inject", "--reliability", str(png)]) == 0
    out = capsys.readouterr().out
    # predictions: 很好! 正面, 好 正面, 一般! 负面, 差 负面, 不好 正面, 太差! 负面; the blank text is left out
    assert "fake.csv (grammar): n=6 accuracy=0.667 recall 正面=0.667 负面=0.667" in out
    # the injection asks for the other label; it wins on the three texts with "!"
    assert "prompt injection flipped 3 of 6 labels (50.0%)" in out
    # a bias of -2 turns the +2 margins into 0, which reads as 负面: only the three negatives stay right
    assert "  -2.0  0.500  0.000  1.000" in out
    # margins are +2 (confidence 0.88) or -1 (0.73): a band of 0.7 keeps every text, 0.8 only the +2 ones
    assert "  0.7  1.000  0.667" in out and "  0.8  0.500  0.667" in out and "  0.9  0.000  nan" in out
    assert "| fake.csv | grammar | 0.667 | 0.67 | 0.67 | 0.139 (" in out and " 50.0% |" in out
    assert "ECE 0.139 (perfectly calibrated: 0." in out      # the floor on six texts: large, whatever it is
    # ECE: three answers at sigmoid(2) = 0.881 with 2 right, three at sigmoid(1) = 0.731 with 2 right
    assert "ECE 0.139" in out
    # the diagram: two bins (0.731 with 2 of 3 right, 0.881 with 2 of 3 right), drawn
    from PIL import Image
    assert Image.open(png).size[0] == 560 and f"reliability diagram: {png}" in out
    assert reliability([True, True, True, False, False, False], [0.881, 0.881, 0.269, 0.269, 0.881, 0.269]) == \
        [(0.731, pytest.approx(2 / 3), 3), (0.881, pytest.approx(2 / 3), 3)]


def test_evaluate_reports_the_accuracy_and_flips_classify_gives(tiny_models, tmp_path):
    model = tiny_models["Q8_0"]
    data = write_set(tmp_path / "small.csv", TEXTS)
    r = subprocess.run([sys.executable, "-m", "allinone_gguf.evaluate", str(model), str(data), "--sweep",
                        "--inject", "--n-threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with AllInOne(model, n_threads=1) as bot:
        clean = [bot.classify(t).label for _, t in TEXTS]
        injected = [bot.classify(t + evaluate.INJECTION["zh"].format(label="负面" if c == "正面" else "正面")).label
                    for (_, t), c in zip(TEXTS, clean)]
    right = sum((c == "正面") == (g == "1") for (g, _), c in zip(TEXTS, clean))
    flipped = sum(c != i for c, i in zip(clean, injected))
    m = re.search(r"small\.csv \(grammar\): n=(\d+) accuracy=([\d.]+)", r.stdout)
    assert m and int(m.group(1)) == len(TEXTS), r.stdout
    assert float(m.group(2)) == pytest.approx(right / len(TEXTS), abs=1e-3), r.stdout
    assert f"prompt injection flipped {flipped} of {len(TEXTS)} labels" in r.stdout
    assert "neutral band" in r.stdout and "| small.csv |" in r.stdout


def test_evaluate_names_a_missing_model(tmp_path):
    data = write_set(tmp_path / "small.csv", [("1", "好")])
    r = subprocess.run([sys.executable, "-m", "allinone_gguf.evaluate", str(tmp_path / "nope.gguf"), str(data)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.gguf" in r.stderr and "Traceback" not in r.stderr
