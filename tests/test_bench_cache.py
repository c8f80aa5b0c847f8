"""`make bench-cache` (allinone_gguf/measure/bench_cache.py): the stream it builds, and a whole run on the fake
backend of test_runtime_logic.py, whose decoded-token counter stands in for llama.cpp's."""
from __future__ import annotations

import csv
import json

import allinone_gguf.runtime
from allinone_gguf.measure import bench_cache
from test_runtime_logic import FakeBot


def write_set(path, texts):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows((i % 2, t) for i, t in enumerate(texts))
    return path


def test_the_stream_repeats_exactly_the_share_asked_and_only_earlier_texts(tmp_path):
    data = write_set(tmp_path / "a.csv", [f"第{i}条{'好' * (i % 4)}" for i in range(80)])
    texts, repeated = bench_cache.build_stream([data], 50, 0.3, seed=1)
    assert len(texts) == 50 and sum(repeated) == 15 and not repeated[0]
    assert len(set(texts)) == 35
    for i, (t, r) in enumerate(zip(texts, repeated)):
        assert (t in texts[:i]) == r                  # a repeat copies an earlier text; the others are new
    assert bench_cache.build_stream([data], 50, 0.3, seed=1) == (texts, repeated)


def test_a_run_on_the_fake_backend_reports_hits_decodes_and_the_same_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(allinone_gguf.runtime, "AllInOne", FakeBot)
    data = write_set(tmp_path / "a.csv", [f"第{i}条{'好' * (i % 4)}{'差' * (i % 3)}" for i in range(60)])
    out = tmp_path / "results"
    assert bench_cache.main(["fake.gguf", "--data", str(data), "--texts", "40", "--chunk", "8",
                             "--out", str(out)]) == 0
    (path,) = out.glob("cache-*-fake.json")
    report = json.loads(path.read_text(encoding="utf-8"))
    assert path.with_suffix(".md").read_text(encoding="utf-8").startswith("Sentiment cache")
    for mode in bench_cache.MODES:
        r = report["runs"][mode]
        assert (r["off"]["hits"], r["off"]["misses"]) == (0, 0) and r["off"]["sentiment_cache"] == 0
        assert (r["on"]["hits"], r["on"]["misses"]) == (12, 28)
        assert 0 < r["on"]["decoded_tokens"] < r["off"]["decoded_tokens"]
        assert r["vs_off"]["labels_differ"] == 0 and r["vs_off"]["max_confidence_diff"] == 0
    assert report["runs"]["messages"]["on"]["repeated"]["n"] == 12
