"""Moderation rules (allinone_gguf/faces/rules.py) and the triage order: the parser table-driven and fuzzed, the
matching, then `classify --rules` and `/v1/classify` "order": "triage" against a fake model whose labels the test
chooses (so the order is known), and the one-line errors of a bad rules file. No real model: a few seconds.
"""
from __future__ import annotations

import csv
import io
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FakeRuntime
from fastapi import FastAPI
from fastapi.testclient import TestClient

from allinone_gguf.faces import cli, rules
from allinone_gguf.faces.openai_api import build_router
from allinone_gguf.faces.rules import RulesError, load_rules, parse_rules, row_columns, triage_key
from allinone_gguf.runtime.sentiment import Sentiment

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "rules.example.txt"


# ----------------------------------------------------------------------------------------- pure: the parser

@pytest.mark.parametrize("line, rule", [
    ("high regex 自杀|不想活 self-harm", ("high", "regex", "自杀|不想活", "self-harm")),
    ("HIGH\tKeyword\t退款", ("high", "keyword", "退款", None)),
    ('critical keyword "kill myself|end it all" self-harm', ("critical", "keyword", "kill myself|end it all", "self-harm")),
    (r"low regex #\d+ hashtag # a comment after the category", ("low", "regex", r"#\d+", "hashtag")),
    ("medium keyword refund   # a comment where the category would be", ("medium", "keyword", "refund", None)),
    ("low\u3000keyword\u3000退款\u3000billing", ("low", "keyword", "退款", "billing")),     # full-width spaces
    ('  low regex "a b" x  ', ("low", "regex", "a b", "x")),
    ('low regex ""quoted"" q', ("low", "regex", '"quoted"', "q")),
    ("", None), (" \t ", None), ("# a comment", None), ("   # an indented comment", None),
])
def test_a_good_line_is_read_field_by_field(line, rule):
    r = rules.parse_rule(line, 7)
    assert (r if r is None else (r.severity, r.kind, r.pattern, r.category)) == rule
    assert r is None or r.line == 7


@pytest.mark.parametrize("line, why", [
    ("high", "found 1 field"),
    ("high regex", "found 2 fields"),
    ("high keyword kill myself self-harm", "found 5 fields: quote a pattern with blanks"),
    ("hgih regex x", "unknown severity 'hgih' (one of low, medium, high, critical)"),
    ("严重 keyword 退款", "unknown severity '严重'"),
    ("high regx x", "unknown kind 'regx' (one of keyword, regex)"),
    ("high regex (unclosed", "bad regular expression '(unclosed'"),
    ("high regex [a-", "bad regular expression"),
    ("high regex a{99999999999}", "bad regular expression"),
    ("high regex a*", "matches the empty text"),
    ("high regex 退款|", "matches the empty text"),
    ('high keyword "kill myself', "is never closed"),
    ('high keyword "" x', "empty pattern"),
    ("high keyword refund||退款", "empty word"),
    ("high # regex x", "unknown kind '#'"),          # a # in the KIND place is no comment
])
def test_a_bad_line_says_what_is_wrong(line, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        rules.parse_rule(line, 1)


def test_errors_name_the_file_and_the_line_through_bom_crlf_and_comments():
    text = "\ufeff# rules\r\nhigh regex 自杀 self-harm\r\n\r\n   \r\nlow keyword 退款 billing\r\nhigh regx x\r\n"
    with pytest.raises(RulesError, match=r"^rules\.txt, line 6: unknown kind 'regx'"):
        parse_rules(text, "rules.txt")
    good = parse_rules(text.replace("regx", "regex"), "rules.txt")
    assert [(r.line, r.name) for r in good.rules] == [(2, "self-harm"), (5, "billing"), (6, "x")]
    assert [r.line for r in parse_rules("low regex a\rlow regex b\n").rules] == [1, 2]      # old Mac line ends


def test_load_rules_reads_the_file_once_and_refuses_unreadable_ones(tmp_path):
    rs = load_rules(EXAMPLE)
    assert len(rs) >= 10 and len(rs.sha256) == 64 and rs.source == str(EXAMPLE)
    cases = {"empty.txt": b"# only a comment\n\n", "latin1.txt": "high regex x\nlow keyword caf\xe9\n".encode("latin-1")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(RulesError, match="empty.txt: no rules in the file"):
        load_rules(tmp_path / "empty.txt")
    with pytest.raises(RulesError, match=r"latin1.txt, line 2: not UTF-8 \(byte 0xe9\)"):
        load_rules(tmp_path / "latin1.txt")
    with pytest.raises(RulesError, match="missing.txt: cannot read the rules file"):
        load_rules(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------- pure: a fuzzed parser

_PIECES = {
    "severity": ["low", "medium", "HIGH", "critical", "hgih", "", "严重", "5", '"high"'],
    "kind": ["keyword", "regex", "REGEX", "regx", "#", "", '"regex"'],
    "pattern": ["退款", "refund|退款", r"自杀|不想活(了)?", r"\d{11}", "(", "[a-", "*x", "a{99999999999}", "x*", "a||b",
                '""', '"unclosed', '"two words"', '"a "b" c"', r"(?<=\w+)x", r"(?P<n>a)(?P=n)", "((((((x))))))",
                "[[:alpha:]]", "\\", "#tag", "a|", "(?i", r"\p{L}", "k" * 300],
    "category": ["", "self-harm", "billing", "# note", "类别", '"quoted cat"', "a b c"],
    "blank": [" ", "\t", "  ", "\u3000", " \t ", "\u00a0", "\u2028"],
    "end": ["\n", "\r\n", "\r"],
}


def _random_text(rnd: random.Random, n: int) -> str:
    """Any code points but surrogates (which no UTF-8 file holds), with the fields' own characters mixed in."""
    out = []
    for _ in range(n):
        pick = rnd.random()
        out.append(rnd.choice(' "#|\t\\()[]*+?{}') if pick < 0.3 else chr(rnd.choice(
            [rnd.randint(0x20, 0x7e), rnd.randint(0x4e00, 0x9fff), rnd.randint(0, 0xd7ff), rnd.randint(0xe000, 0x10ffff)])))
    return "".join(out)


def _random_line(rnd: random.Random) -> str:
    """Mostly a well-formed rule (so files get past their first lines), else a comment, a blank line, noise, or a
    rule with a wrong, missing or random field."""
    pick = rnd.random()
    if pick < 0.08:
        return rnd.choice(["", "  ", "\t"])
    if pick < 0.16:
        return rnd.choice(["", "  ", "\t"]) + "#" + _random_text(rnd, rnd.randint(0, 20))
    if pick < 0.2:
        return _random_text(rnd, rnd.randint(1, 40))
    if pick < 0.75:
        kind = rnd.choice(rules.KINDS)
        pattern = (rnd.choice(_GOOD_REGEX) if kind == "regex" else
                   "|".join(re.sub(r'[\s|#"]', "", _random_text(rnd, rnd.randint(1, 6))) or "词"
                            for _ in range(rnd.randint(1, 3))))
        fields = [rnd.choice(rules.SEVERITIES).upper() if rnd.random() < 0.2 else rnd.choice(rules.SEVERITIES), kind,
                  pattern] + rnd.choice([[], ["cat"], ["类别"], ["x", "# note"]])
    else:
        fields = [rnd.choice(_PIECES[name]) for name in ("severity", "kind", "pattern", "category")]
        fields = fields[:rnd.choice([1, 2, 3, 3, 4, 4, 4])]
        if rnd.random() < 0.3:
            fields[rnd.randrange(len(fields))] = _random_text(rnd, rnd.randint(1, 8))
    return rnd.choice(_PIECES["blank"]).join(fields)


_GOOD_REGEX = [r"自杀|不想活(了)?", r"\d{11}", r"(?<!\d)1[3-9]\d{9}(?!\d)", r"[\w.+-]+@[\w-]+\.\w+", r"退(款|钱)", "#tag",
               r"(?P<n>a)(?P=n)", "((((((x))))))", r"\bscam\b"]


def test_fuzzed_rules_files_parse_or_fail_on_a_named_line():
    """2,000 random files: each parses into usable rules or raises RulesError naming its first bad line."""
    rnd = random.Random(21)
    parsed = failed = deep = 0
    for _ in range(2000):
        lines = [_random_line(rnd) for _ in range(rnd.randint(0, 12))]
        text = ("\ufeff" if rnd.random() < 0.2 else "") + "".join(line + rnd.choice(_PIECES["end"]) for line in lines)
        as_read = rules._LINE_END.split(text.removeprefix("\ufeff"))   # random text may hold line ends of its own
        try:
            rs = parse_rules(text, "fuzz.txt")
        except RulesError as exc:
            failed += 1
            number = re.match(r"fuzz\.txt, line (\d+): \S", str(exc))
            assert number, str(exc)
            n = int(number.group(1))
            deep += n > 1
            for k, line in enumerate(as_read[:n - 1], 1):     # every line before it is a rule, a comment or blank
                rules.parse_rule(line, k)
            with pytest.raises(ValueError):
                rules.parse_rule(as_read[n - 1], n)
            continue
        parsed += 1
        for r in rs.rules:
            assert r.severity in rules.SEVERITIES and r.kind in rules.KINDS and r.pattern
            assert r.regex.search("") is None
        for _ in range(3):
            found = rs.match(_random_text(rnd, rnd.randint(0, 12)))
            assert row_columns(found)["severity"] in (None, *rules.SEVERITIES)
    assert parsed > 300 and failed > 300 and deep > 300, (parsed, failed, deep)   # the fuzz reaches every outcome


def test_fuzzed_rules_files_as_bytes(tmp_path):
    """Random bytes on disk (broken UTF-8 among them): load_rules gives rules or one RulesError naming the file."""
    rnd = random.Random(4)
    path = tmp_path / "fuzz.txt"
    for _ in range(200):
        data = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 60)))
        if rnd.random() < 0.5:
            data = b"low keyword x\r\n" + data
        path.write_bytes(data)
        try:
            load_rules(path)
        except RulesError as exc:
            assert re.match(rf"{re.escape(str(path))}(, line \d+|: no rules in the file)", str(exc)), str(exc)


# ------------------------------------------------------------------------------------------ pure: matching

def test_matching_ignores_case_keeps_english_words_whole_and_finds_chinese_anywhere():
    rs = parse_rules("low keyword kill|refund\nmedium keyword 退款 billing\nhigh regex CHARGE\\s*back cb\n")
    assert [m.name for m in rs.match("I want a REFUND")] == ["kill|refund"]
    assert rs.match("skills, refunds, killer") == []                   # whole English words only
    assert [(m.name, m.text) for m in rs.match("申请退款中")] == [("billing", "退款")]
    assert [(m.severity, m.text) for m in rs.match("a chargeBack, kill it, 退款")] == [
        ("high", "chargeBack"), ("medium", "退款"), ("low", "kill")]   # most severe first


def test_row_columns_give_the_highest_severity_and_each_name_once():
    rs = parse_rules("low keyword 退款 money\nmedium keyword 退钱 money\nlow regex \\d{11}\n")
    assert row_columns(rs.match("退款退钱 13812345678")) == {"severity": "medium", "rules": "money; \\d{11}"}
    assert row_columns(rs.match("很好吃")) == {"severity": None, "rules": None}


def test_triage_order_is_severity_then_p_negative_with_errors_last():
    rows = {"error": (None, None), "calm negative": (None, 0.95), "calm positive": (None, 0.1),
            "low negative": ("low", 0.9), "low positive": ("low", 0.2), "critical positive": ("critical", 0.3),
            "critical error": ("critical", None)}
    order = sorted(rows, key=lambda k: triage_key(*rows[k]))
    assert order == ["critical positive", "low negative", "low positive", "calm negative", "calm positive",
                     "critical error", "error"]


# ------------------------------------------------------------------------- logic: classify --rules on a fake

# The fake's answers: (label, confidence). "不想活" comes out 正面 on purpose: a rule surfaces what the label missed.
ANSWERS = {"这家店太好吃了": ("正面", 0.9), "我要退款，太差了": ("负面", 0.8), "我真的不想活了": ("正面", 0.7),
           "服务太差了": ("负面", 0.95), "call me 13812345678, 太差": ("负面", 0.6)}
LINES = ["这家店太好吃了", "我要退款，太差了", "", "我真的不想活了", "服务太差了", "call me 13812345678, 太差"]


def _sentiment(text: str, labels=None) -> Sentiment:
    label, conf = ANSWERS[text]
    probs = {"正面": conf if label == "正面" else 1 - conf, "负面": conf if label == "负面" else 1 - conf}
    return Sentiment(label, conf, probs, ("正面", "负面"))


class ChosenLabels(FakeRuntime):
    sentiment_adapter = None
    load = {"waiting": 0, "streams": 0, "slots": 1}

    def classify(self, text, labels=None):
        return _sentiment(text, labels)

    def classify_many(self, texts, labels=None):
        return [_sentiment(t, labels) for t in texts]

    def close(self):
        pass


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(cli, "load_bot", lambda path, overrides: (ChosenLabels(), 0.0))


def classify(*argv: str) -> int:
    from allinone_gguf.__main__ import main
    return main(["classify", *map(str, argv), "-q"])


@pytest.mark.parametrize("to_stdout", [False, True])
def test_classify_rules_triage_order_and_labels_untouched(fake_model, tmp_path, capfd, to_stdout):
    src = tmp_path / "messages.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "triage.csv"
    assert classify(src, "-o", "-" if to_stdout else out, "--rules", EXAMPLE, "--sort", "priority") == 0
    captured = capfd.readouterr()      # the rows go to file descriptor 1 itself
    rows = list(csv.DictReader(io.StringIO(captured.out) if to_stdout else open(out, encoding="utf-8")))
    assert [(r["text"], r["severity"], r["rules"]) for r in rows] == [
        ("我真的不想活了", "critical", "self-harm"), ("我要退款，太差了", "medium", "complaint"),
        ("call me 13812345678, 太差", "low", "personal-data"), ("服务太差了", "", ""), ("这家店太好吃了", "", ""),
        ("", "", "")]
    assert all(r["sentiment"] == ANSWERS[r["text"]][0] for r in rows[:-1])   # the rules never move a label
    assert rows[-1]["error"] == "line 3: empty text"
    say = captured.err if to_stdout else captured.out
    assert "rules (11 from" in say and "3 of 6 rows matched (1 critical, 1 medium, 1 low)" in say


def test_classify_without_rules_keeps_the_old_priority_and_columns(fake_model, tmp_path, capsys):
    src = tmp_path / "in.csv"
    with open(src, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("severity", "text")] + [("high", t) for t in LINES if t])
    assert classify(src, "-o", tmp_path / "o.csv", "--sort", "priority") == 0   # its `severity` column is not read
    rows = list(csv.DictReader(open(tmp_path / "o.csv", encoding="utf-8")))
    assert list(rows[0]) == ["severity", "text", "sentiment", "confidence", "error"]
    assert [r["text"] for r in rows] == ["服务太差了", "我要退款，太差了", "call me 13812345678, 太差", "我真的不想活了",
                                         "这家店太好吃了"]
    assert classify(src, "-o", tmp_path / "r.csv", "--rules", EXAMPLE) == 2
    assert "already has column(s) severity, which --rules adds" in capsys.readouterr().err


def test_a_bad_rules_file_is_one_error_line_before_the_model_loads(tmp_path):
    bad = tmp_path / "rules.txt"
    bad.write_text("\ufeff# mine\r\nhigh regex 自杀 self-harm\r\nhigh regex (退款 billing\r\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "classify", "-", "--rules", str(bad), "--model",
                        str(tmp_path / "no-model.gguf")], cwd=ROOT, input="好\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {bad}, line 3: bad regular expression '(退款': missing ), unterminated "
                                     "subpattern at position 0"]


def test_the_app_refuses_a_bad_rules_file_at_start(tmp_path):
    bad = tmp_path / "rules.txt"
    bad.write_text("critical keyword 不想活 self-harm\nurgent keyword 退款 billing\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "app.py", "--no-page", "--rules", str(bad), "--model",
                        str(tmp_path / "no-model.gguf")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: {bad}, line 2: unknown severity 'urgent' (one of low, medium, high, "
                                     "critical)"]


def test_ray_sink_adds_the_rules_columns(tmp_path):
    """The Ray engine matches rules on the driver as rows arrive; its sink, fed a batch by hand (no Ray)."""
    import json

    import numpy as np

    from allinone_gguf.faces import ray_classify
    from allinone_gguf.faces.shards import InputFile, Shard
    texts = ["我真的不想活了", "很好"]
    f = InputFile(str(tmp_path / "in.txt"), "txt", 0, 0, rows=2)
    sink = ray_classify._Sink(tmp_path, "csv", [f], [Shard(0, 0, 0, 1, 1, 2)], "text", load_rules(EXAMPLE))
    batch = {"shard": np.array([0, 0]), "seq": np.array([0, 1]), "fields": [json.dumps({"text": t}) for t in texts],
             "sentiment": np.array(["正面", "正面"], dtype=object), "confidence": np.array([0.7, 0.9]),
             "error": np.array([None, None], dtype=object)}

    class Bar:
        def update(self):
            pass
    by_index = {0: sink.shards[0]}
    for i in range(2):
        sink._take(batch, i, by_index, Bar())
    rows = list(csv.DictReader(open(sink.path(sink.shards[0]), encoding="utf-8")))
    assert [(r["text"], r["sentiment"], r["severity"], r["rules"]) for r in rows] == [
        ("我真的不想活了", "正面", "critical", "self-harm"), ("很好", "正面", "", "")]


# ------------------------------------------------------------------------------ logic: /v1/classify triage

def _api(with_rules: bool) -> TestClient:
    app = FastAPI()
    app.include_router(build_router(lambda: ChosenLabels(), lambda: "fake.gguf",
                                    rules=load_rules(EXAMPLE) if with_rules else None))
    return TestClient(app)


def test_api_triage_order_keeps_each_index_and_carries_the_matches():
    texts = [t for t in LINES if t]
    r = _api(True).post("/v1/classify", json={"input": texts, "order": "triage"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [2, 1, 4, 3, 0]
    assert all(texts[d["index"]] in ANSWERS and d["label"] == ANSWERS[texts[d["index"]]][0] for d in data)
    assert [d["severity"] for d in data] == ["critical", "medium", "low", None, None]
    first = data[0]["rules"][0]
    assert (first["name"], first["category"], first["severity"], first["kind"], first["match"]) == (
        "self-harm", "self-harm", "critical", "regex", "不想活了")
    assert first["line"] == next(r.line for r in load_rules(EXAMPLE).rules if r.category == "self-harm")
    plain = _api(True).post("/v1/classify", json={"input": texts}).json()["data"]
    assert [d["index"] for d in plain] == [0, 1, 2, 3, 4] and plain[0]["rules"] == []


def test_api_without_rules_triage_is_p_negative_and_items_are_as_before():
    data = _api(False).post("/v1/classify", json={"input": [t for t in LINES if t], "order": "triage"}).json()["data"]
    assert [d["index"] for d in data] == [3, 1, 4, 2, 0]
    assert all(set(d) == {"index", "label", "confidence", "probs", "source"} for d in data)


@pytest.mark.parametrize("order", ["priority", "TRIAGE", "", 1, ["triage"]])
def test_api_unknown_order_is_an_openai_shaped_400_naming_the_param(order):
    r = _api(True).post("/v1/classify", json={"input": ["好"], "order": order})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "order" and error["type"] == "invalid_request_error"
    assert "order must be one of 'input', 'triage'" in error["message"]
