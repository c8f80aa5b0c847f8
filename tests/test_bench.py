"""`python -m allinone_gguf bench`: helpers (pure), the measuring code on a fake model whose answers and token
counts the test controls, and the real entry point on the tiny model (every field present, the accuracy the
model's own classify() gives, files written). No test asserts a speed."""
from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FakeRuntime

import allinone_gguf.runtime
from allinone_gguf.measure import bench, bench_report, bench_worker
from allinone_gguf.measure.machine import write_result
from allinone_gguf.scoring import read_labeled_csv

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = ("short", "medium", "long")


def run(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allinone_gguf", "bench", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("label", "text"), *rows])
    return path


# ------------------------------------------------------------------------------------------------- pure

def test_percentile_interpolates_like_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert bench_worker.percentile(xs, 50) == 3.0
    assert bench_worker.percentile(xs, 95) == pytest.approx(4.8)
    assert bench_worker.percentile([7.0], 95) == 7.0


def test_every_bench_names_its_results_kind_date_model(tmp_path):
    path = write_result("serving", Path("models/m/qwen2.5-0.5b-Q4_K_M.gguf"), {"p95": 1.5}, "| a |\n", tmp_path / "r")
    assert path == tmp_path / "r" / f"serving-{datetime.date.today().isoformat()}-qwen2.5-0.5b-Q4_K_M.json"
    assert json.loads(path.read_text(encoding="utf-8")) == {"p95": 1.5}
    assert path.with_suffix(".md").read_text(encoding="utf-8") == "| a |\n"


def test_sample_texts_have_three_distinct_lengths():
    texts = bench_worker.sample_texts()
    assert {k: len(v) for k, v in texts.items()} == {"short": 12, "medium": 12, "long": 12}
    mean = {k: sum(map(len, v)) / len(v) for k, v in texts.items()}
    assert 15 < mean["short"] < 35 and 70 < mean["medium"] < 130 and 350 < mean["long"] < 600
    assert all(len(set(v)) == len(v) for v in texts.values())      # no text timed twice


def test_runs_are_capped_by_the_sample_texts():
    assert bench.BenchSettings().runs == bench_worker.MAX_RUNS
    assert {len(v) for v in bench_worker.sample_texts().values()} == {bench_worker.MAX_RUNS}


def test_labeled_csv_reader_normalises_gold_and_names_bad_rows(tmp_path):
    good = write_csv(tmp_path / "good.csv", [("1", "好"), ("negative", "差"), ("正面", ""), ("0", "一般")])
    assert read_labeled_csv(good) == [("正面", "好"), ("负面", "差"), ("正面", ""), ("负面", "一般")]
    assert read_labeled_csv(good, limit=2) == [("正面", "好"), ("负面", "差")]
    bad = write_csv(tmp_path / "bad.csv", [("1", "好"), ("maybe", "嗯")])
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: gold label 'maybe'"):
        read_labeled_csv(bad)
    (tmp_path / "cols.csv").write_text("gold,body\n1,好\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no column label, text"):
        read_labeled_csv(tmp_path / "cols.csv")


def test_baseline_uses_the_projects_prompts_and_helpers_without_llama_cpp():
    """measure/baseline.py runs under a Python with torch and without this package or llama.cpp."""
    code = ("import sys, runpy\n"
            "sys.modules.update(llama_cpp=None, numpy=None)   # importing either now fails\n"
            "g = runpy.run_path('allinone_gguf/measure/baseline.py', run_name='baseline')\n"
            "print(g['SENTIMENT_SYSTEM']); print(g['CHAT_SYSTEM']); print(g['percentile']([1.0, 2.0, 4.0], 50))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    from allinone_gguf.runtime.prompts import CHAT_SYSTEM, SENTIMENT_PROMPTS
    assert r.stdout == f"{SENTIMENT_PROMPTS['seed'].system['zh']}\n{CHAT_SYSTEM['zh']}\n2.0\n"


def test_canonical_label():
    assert [bench_worker.canonical_label(x) for x in ("正面", "Negative", "中性")] == ["正面", "负面", "中性"]


def test_summarise_accuracy_counts_invalid_outputs():
    raw = {"d": {"gold": ["1", "1", "0", "0", "negative"], "predicted": ["正面", "负面", "负面", "中性", "负面"],
                 "seconds": 2.0}}
    a = bench.summarise_accuracy(raw)["d"]
    assert (a["n"], a["accuracy"], a["invalid"], a["texts_per_s"]) == (5, 0.6, 1, 2.5)
    assert a["recall"] == {"正面": 0.5, "负面": pytest.approx(2 / 3)}


def _entry(quant, size, p50, acc):
    return {"quant": quant, "file": f"m-{quant}.gguf", "size_mb": size, "load": {"seconds": 1.0},
            "sentiment": {"alone": {k: {"p50_ms": p50, "p95_ms": p50 * 2} for k in LENGTHS}},
            "accuracy": {"d": {"accuracy": acc, "invalid": 0, "n": 10, "recall": {"正面": acc, "负面": acc}}}}


def test_ratios_and_markdown_compare_with_the_biggest_file():
    models = [_entry("Q4_K_M", 400.0, 50.0, 0.8), _entry("Q8_0", 500.0, 100.0, 0.85), _entry("F16", 1000.0, 200.0, 0.9)]
    r = bench_report.ratios(models)
    assert r["reference"] == "F16"
    assert r["models"]["Q4_K_M"]["file size (MB)"] == 0.4
    assert r["models"]["Q8_0"]["sentiment p50, short (ms)"] == 0.5
    assert r["models"]["Q4_K_M"]["accuracy, mean over data sets (points vs reference)"] == pytest.approx(-10)
    report = {"conditions": {"date": "2025-01-01T00:00:00", "host": "h", "cpu": "Some CPU", "logical_cpus": 2,
                             "physical_cores": 2, "n_threads": 2, "n_ctx": 2048, "sentiment_prompt": "fewshot",
                             "llama_cpp_python": "0.3.36", "python": "3.11", "git": "abc", "loadavg_start": [1, 1, 1],
                             "loadavg_end": [2, 2, 2]},
              "command": "python -m allinone_gguf bench ...", "texts": {"short": {"mean_chars": 22}},
              "runs": 12, "turns": 4, "reply_tokens": 64, "models": models}
    md = bench_report.render_markdown(report)
    assert "Some CPU" in md and "threads 2, context 2048" in md and "python -m allinone_gguf bench" in md
    assert "| file size (MB) | 400 | 500 | 1000 | 0.40× | 0.50× |" in md
    assert "| sentiment p50, short (ms) | 50 | 100 | 200 | 0.25× | 0.50× |" in md
    assert "-10.0 points" in md


# ------------------------------------------------------------------------------------ logic: fake model

class FakeBot(FakeRuntime):
    """Answers 正面 exactly for texts containing "好"; replies with four pieces; counts tokens as llama.cpp would
    for such a reply: PROMPT_TOKENS decoded in a batch, then one decode per piece after the first."""

    PROMPT_TOKENS = 7
    instances: list = []

    def __init__(self, path, **settings):
        self.settings, self.classified = settings, []
        self.counters = {"prompt_tokens": 0, "single_tokens": 0}
        FakeBot.instances.append(self)

    def classify(self, text):
        self.classified.append(text)
        self.counters["prompt_tokens"] += 100      # a classification's decode, outside the timed reply
        return type("S", (), {"label": "正面" if "好" in text else "负面", "source": "grammar"})()

    sentiment_adapter = None

    def stream_reply(self, text, history=None, sentiment=None, max_tokens=None, seed=None):
        self.counters["prompt_tokens"] += self.PROMPT_TOKENS
        for i, piece in enumerate(["你", "好", "呀", "!"][:max_tokens]):
            self.counters["single_tokens"] += i > 0
            yield piece

    def stats(self):
        return {**self.counters, "decoded_tokens": sum(self.counters.values())}

    def reply(self, *a, **k):
        return "".join(self.stream_reply(*a, **k))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_run_job_on_a_fake_model_scores_the_answers_it_gave(monkeypatch, tmp_path):
    monkeypatch.setattr(allinone_gguf.runtime, "AllInOne", FakeBot)
    data = write_csv(tmp_path / "d.csv", [("1", "很好"), ("1", "一般"), ("0", "不好"), ("0", "差"), ("0", "太差")])
    job = {"model": "x.gguf", "settings": {"n_threads": 1}, "texts": bench_worker.sample_texts(), "runs": 3,
           "turns": 2, "reply_tokens": 3, "seed": 0, "datasets": {"d": read_labeled_csv(data)}, "limit": 0}
    result = bench_worker.run_job(job)
    bot = FakeBot.instances[-1]
    assert bot.settings == {"n_threads": 1}
    # warm-up (3) + alone (3 per length) + interleaved (2 per length) + data set (5)
    assert len(bot.classified) == 3 + 9 + 6 + 5
    a = bench.summarise_accuracy(result["accuracy"])["d"]
    # predictions: 很好 正面, 一般 负面, 不好 正面, 差 负面, 太差 负面 -> 3 of 5 right
    assert (a["n"], a["accuracy"], a["invalid"]) == (5, 0.6, 0)
    assert a["recall"] == {"正面": 0.5, "负面": pytest.approx(2 / 3)}
    assert all(result["sentiment"][mode][k]["n"] == n for mode, n in (("alone", 3), ("interleaved", 2))
               for k in LENGTHS)
    reply = result["reply"]
    assert reply["turns"] == 6 and reply["token_counts"] == "llama.cpp context counters"
    assert reply["tokens_per_reply"] == 3                                   # reply_tokens reached the model
    assert reply["prompt_tokens_per_reply"] == FakeBot.PROMPT_TOKENS       # the classifications are not counted
    assert result["load"]["peak_rss_mb_after_chat"] >= result["load"]["rss_mb_after_load"] > 0


# ------------------------------------------------------------------------ behaviour: the real entry point

def test_quant_from_metadata_not_only_the_name(tiny_models, tmp_path):
    for quant, path in tiny_models.items():
        assert bench.quant_of(path) == quant
        link = tmp_path / f"renamed-{quant.lower()}-x.gguf"
        link.symlink_to(path)
        assert bench.quant_of(link) == quant


def test_bench_on_the_tiny_model_writes_every_field(tiny_models, tmp_path):
    rows = [("1", "味道很好"), ("0", "送得太慢"), ("1", "还会再来"), ("0", "菜是凉的"), ("1", "非常满意"), ("0", "很失望")]
    data = write_csv(tmp_path / "tiny_set.csv", rows)
    expected = {}   # quant -> the confusion table classify() gives on these rows, in this process
    for quant in ("Q4_K_M", "F16"):
        with allinone_gguf.runtime.AllInOne(tiny_models[quant], n_threads=1) as bot:
            confusion = {"正面": {}, "负面": {}}
            for (gold, _), s in zip(read_labeled_csv(data), (bot.classify(t) for _, t in rows)):
                confusion[gold][s.label] = confusion[gold].get(s.label, 0) + 1
            expected[quant] = confusion
    out = tmp_path / "results"
    no_torch = importlib.util.find_spec("torch") is None
    r = run("--model", tiny_models["Q4_K_M"], "--model", tiny_models["F16"], "--data", data, "--runs", 2,
            "--turns", 1, "--reply-tokens", 8, "--n-threads", 1, "--out", out, "--baseline", tmp_path,
            "--baseline-python", sys.executable if no_torch else tmp_path / "no-python")
    assert r.returncode == 0, r.stderr
    assert "skipped the transformers baseline" in r.stderr
    (json_path,) = out.glob("*.json")
    family = allinone_gguf.runtime.model_family(tiny_models["Q4_K_M"])
    assert json_path.name == f"bench-{datetime.date.today().isoformat()}-{family}.json"
    assert json_path.with_suffix(".md").is_file()
    report = json.loads(json_path.read_text(encoding="utf-8"))
    c = report["conditions"]
    assert c["cpu"] and c["logical_cpus"] >= 1 and c["n_threads"] == 1 and c["n_ctx"] > 0
    assert c["llama_cpp_python"] and len(c["loadavg_start"]) == 3 and len(c["loadavg_end"]) == 3
    assert "baseline" not in report
    assert [m["quant"] for m in report["models"]] == ["Q4_K_M", "F16"]
    for m in report["models"]:
        assert "error" not in m
        assert m["size_mb"] > 0 and m["load"]["seconds"] > 0
        assert m["load"]["peak_rss_mb_after_chat"] >= m["load"]["peak_rss_mb_after_load"] > m["load"]["rss_before_mb"] > 0
        for mode, n in (("alone", 2), ("interleaved", 1)):
            for k in LENGTHS:
                lat = m["sentiment"][mode][k]
                assert lat["n"] == n and 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["mean_chars"] > 0
        reply = m["reply"]
        assert reply["turns"] == 3 and reply["token_counts"] == "llama.cpp context counters"
        for key in ("ttft_ms_p50", "gen_tokens_per_s", "prompt_tokens_per_s", "turn_s_p50", "tokens_per_reply"):
            assert reply[key] > 0, key
        a = m["accuracy"]["tiny_set"]
        want = expected[m["quant"]]
        right = want["正面"].get("正面", 0) + want["负面"].get("负面", 0)
        assert (a["n"], a["invalid"], a["confusion"]) == (len(rows), 0, want)
        assert a["accuracy"] == pytest.approx(right / len(rows))
    assert report["ratios"]["reference"] == "F16"
    assert 0 < report["ratios"]["models"]["Q4_K_M"]["file size (MB)"] < 1
    md = json_path.with_suffix(".md").read_text(encoding="utf-8")
    assert md in r.stdout and "| Q4_K_M | F16 | Q4_K_M / F16 |" in md and "tiny_set" in md
    from PIL import Image
    with Image.open(json_path.with_suffix(".png")) as img:
        assert img.size == (1500, 900)


def test_bench_user_mistakes_are_one_line_errors(tmp_path):
    r = run("--model", tmp_path / "missing.gguf")
    assert r.returncode == 2 and "make models" in r.stderr and "Traceback" not in r.stderr
    r = run()
    assert r.returncode == 2 and "--model" in r.stderr
