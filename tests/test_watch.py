"""`python -m allinone_gguf watch` (faces/watch.py, faces/watch_report.py): times and the report (pure), then the
real command in a subprocess on the tiny model (outputs against the labels it wrote, bad rows, resume after an
interruption), then report.html in Chromium from file:// with every non-file request blocked and recorded.

    .venv/bin/python -m pytest tests/test_watch.py
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from allinone_gguf.faces import watch, watch_report
from allinone_gguf.runtime import BRANCHES
from allinone_gguf.scoring import NEGATIVE
from allinone_gguf.wellbeing import AlertRule, Message, alerts
from conftest import ctrl_c_reaches_it

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
LABELS = {"正面", "负面"}
PEOPLE = ("阿明", "Bea <b>&", "carl")
PER_PERSON = 24
BAD_TIME_LINE, NO_PERSON_LINE = 9, 14          # input lines (header = line 1) given a bad time / no person
# Every negative counts and one fires an alert: whatever the tiny random model says, a person with a 负面 has
# an alert (the resumed run below uses the default rule instead).
ANY_NEGATIVE = ("--min-confidence", "0.5", "--negatives", "1", "--window", "1")


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allinone_gguf", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_messages(path: Path) -> list[list[str]]:
    """author,time,text rows over 6 days, people interleaved; one unreadable time and one empty person."""
    start = datetime.datetime(2026, 11, 1, 8)
    rows = []
    for i in range(PER_PERSON * len(PEOPLE)):
        person = PEOPLE[i % len(PEOPLE)]
        when = start + datetime.timedelta(hours=6 * (i // len(PEOPLE)), minutes=i)
        text = ("等了两个小时，菜都凉了，好气。" if i % 4 else "今天很开心，谢谢你！") + f" #{i}"
        rows.append([person, when.isoformat(sep=" ", timespec="minutes"), text])
    rows[BAD_TIME_LINE - 2][1] = "昨天下午"
    rows[NO_PERSON_LINE - 2][0] = " "
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([["author", "time", "text"], *rows])
    return rows


# ------------------------------------------------------------------------------------------------ pure

@pytest.mark.parametrize("value, wall", [
    ("2026-11-03T08:30:00", "2026-11-03 08:30:00"),
    ("2026-11-03T08:30:00Z", "2026-11-03 08:30:00"),
    ("2026-11-03T08:30:00+08:00", "2026-11-03 08:30:00"),    # the clock as written: days are counted on it
    ("2026-11-03 08:30", "2026-11-03 08:30:00"),
    ("2026-11-03 08:30:15", "2026-11-03 08:30:15"),
    ("2026/11/03 08:30", "2026-11-03 08:30:00"),
    ("2026-11-03", "2026-11-03 00:00:00"),
    ("1793694600", "2026-11-03 08:30:00"),                    # unix seconds, UTC
    (1793694600, "2026-11-03 08:30:00"),
    (1793694600.5, "2026-11-03 08:30:00.500000"),
    ("1793694600000", "2026-11-03 08:30:00"),                 # 13 digits: milliseconds
    (datetime.datetime(2026, 11, 3, 8, 30), "2026-11-03 08:30:00"),
    (datetime.date(2026, 11, 3), "2026-11-03 00:00:00"),
])
def test_parse_time_reads_the_usual_forms(value, wall):
    assert watch.parse_time(value)[0].isoformat(sep=" ") == wall


def test_parse_time_orders_zoned_times_by_the_instant():
    assert watch.parse_time("2026-11-03T08:30:00+08:00")[1] == watch.parse_time("2026-11-03 00:30")[1]


@pytest.mark.parametrize("value", ["", " ", "昨天下午", "2026-13-01", "2026-11-03 25:00", None, "nan", float("inf"),
                                   "1e400", True])
def test_parse_time_refuses_what_is_not_a_time(value):
    with pytest.raises((ValueError, TypeError)):
        watch.parse_time(value)


def fake_rows(person, labels, conf=0.9, start=1):
    day = datetime.datetime(2026, 11, 1, 9)
    return [watch.Row(start + i, start + i + 1, person, day + datetime.timedelta(hours=i),
                      (day + datetime.timedelta(hours=i)).timestamp(), f"{person} 消息 {i}", label, conf)
            for i, label in enumerate(labels)]


def test_people_with_alerts_come_first_and_alerts_name_their_messages():
    rule = AlertRule(streak_days=0)
    calm = fake_rows("calm", ["正面"] * 6)
    sad = fake_rows("sad", ["正面", "负面", "负面", "正面", "负面", "正面"], start=100)
    people = watch.watch_people(calm + sad[::-1], rule)             # out of order in, time order out
    assert [p.name for p in people] == ["sad", "calm"]
    assert [r.n for r in people[0].rows] == [r.n for r in sad]
    (row,) = watch.alert_rows(people)
    assert json.loads(row["rows"]) == [101, 102, 104] and row["person"] == "sad"
    assert json.loads(row["texts"]) == ["sad 消息 1", "sad 消息 2", "sad 消息 4"]
    assert people[0].summary()["longest_negative_run"] == 2 and people[0].summary()["alert"] == "yes"


def test_the_report_escapes_every_text_and_fetches_nothing():
    rule = AlertRule(streak_days=0, negatives=1, window=1)
    rows = fake_rows('<img src="http://x/y.png" onerror="alert(1)">', ["负面", "正面"])
    page = watch_report.render(watch.watch_people(rows, rule), rule, {
        "inputs": ["a<b>.csv"], "labels": "out/labels.csv", "model": "m.gguf", "rows": 2, "unlabelled": 0,
        "bad": ["a<b>.csv: line 3: unreadable time '<script>'"], "times": True, "rule": "r"})
    assert "<img" not in page and "<script" not in page and "&lt;img src=&quot;http://x/y.png&quot;" in page
    assert page.count("<svg") == 1 and "<link" not in page and "url(" not in page and "@import" not in page
    assert all(ref.startswith("#") for ref in re.findall(r'<[^<>]*\s(?:src|href)="([^"]*)"', page))
    assert "&lt;script&gt;" in page


# --------------------------------------------------------------------------------------- the real command

@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["Q4_K_M"]


def test_help_explains_the_rule_with_its_defaults_and_loads_no_model():
    code = ("import sys, contextlib, io\nfrom allinone_gguf.__main__ import build_parser\n"
            "out = io.StringIO()\nwith contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "    build_parser().parse_args(['watch', '--help'])\n"
            "print(sorted({'llama_cpp', 'numpy', 'gradio', 'tqdm'} & set(sys.modules)))\nprint(out.getvalue())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("[]"), r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    d = AlertRule()
    assert f"--negatives ({d.negatives}) of the last --window ({d.window})" in text
    assert f"(default: {d.min_confidence})" in text and "report.html" in text and "example:" in text
    assert "--engine {local,ray}" in text and "--sentiment-adapter" in text


@pytest.fixture(scope="module")
def watched(model, tmp_path_factory) -> dict:
    """One watch of a CSV on the tiny model."""
    tmp = tmp_path_factory.mktemp("watch")
    src = tmp / "messages.csv"
    rows = write_messages(src)
    out = tmp / "out"
    r = run("watch", src, "--by", "author", "--time", "time", "-o", out, "--model", model, "--threads", 1, "-q",
            *ANY_NEGATIVE)
    assert r.returncode == 0, r.stderr
    return {"src": src, "rows": rows, "out": out, "run": r}


def rule_of(args) -> AlertRule:
    flags = dict(zip(args[::2], args[1::2]))
    return AlertRule(min_confidence=float(flags.get("--min-confidence", AlertRule.min_confidence)),
                     negatives=int(flags.get("--negatives", AlertRule.negatives)),
                     window=int(flags.get("--window", AlertRule.window)))


def check_outputs(out: Path, src_rows: list[list[str]], rule: AlertRule) -> list[dict]:
    """alerts.csv and people.csv against the rule applied to DIR/labels.csv, row by row."""
    labels = read_csv(out / "labels.csv")
    assert [[r["author"], r["time"], r["text"]] for r in labels] == src_rows        # every input row, in order
    assert all(r["sentiment"] in LABELS and not r["error"] for r in labels)
    usable = [(n, r) for n, r in enumerate(labels, 1) if n + 1 not in (BAD_TIME_LINE, NO_PERSON_LINE)]
    expected = []
    for person in PEOPLE:
        mine = [Message(n, datetime.datetime.fromisoformat(r["time"]), r["sentiment"] == NEGATIVE,
                        float(r["confidence"])) for n, r in usable if r["author"] == person]   # in time order
        expected += [(person, a.messages) for a in alerts(mine, rule)]
    found = read_csv(out / "alerts.csv")
    assert sorted((a["person"], tuple(json.loads(a["rows"]))) for a in found) == sorted(expected)
    for a in found:
        refs = json.loads(a["rows"])
        assert json.loads(a["lines"]) == [n + 1 for n in refs]                    # input line = labels row + 1
        for n, text in zip(refs, json.loads(a["texts"])):
            lab = labels[n - 1]
            assert lab["author"] == a["person"] and lab["text"] == text
            assert lab["sentiment"] == NEGATIVE and float(lab["confidence"]) >= rule.min_confidence
        assert len(refs) >= rule.negatives
    people = {p["person"]: p for p in read_csv(out / "people.csv")}
    assert set(people) == set(PEOPLE)
    for person, p in people.items():
        assert (p["alert"] == "yes") == any(name == person for name, _ in expected)
    return found


def test_watch_writes_alerts_people_and_report_that_follow_the_labels(watched):
    out = watched["out"]
    assert {p.name for p in out.iterdir()} == {"labels.csv", "alerts.csv", "people.csv", "report.html"}
    found = check_outputs(out, watched["rows"], rule_of(ANY_NEGATIVE))
    assert found, "the tiny model gave no 负面 at all: the test cannot see an alert"
    people = read_csv(out / "people.csv")
    assert people[0]["alert"] == "yes"                                             # alerts first
    assert sum(int(p["messages"]) for p in people) == len(watched["rows"]) - 2


def test_bad_time_and_empty_person_are_reported_with_their_lines_and_left_out(watched):
    err, src = watched["run"].stderr, watched["src"]
    assert f"{src}: line {BAD_TIME_LINE}: unreadable time '昨天下午' (--time time); left out of the alerts" in err
    assert f"{src}: line {NO_PERSON_LINE}: empty person (--by author)" in err
    assert "2 rows left out of the alerts" in watched["run"].stdout
    html = (watched["out"] / "report.html").read_text(encoding="utf-8")
    assert f"line {BAD_TIME_LINE}: unreadable time" in html


def test_watch_without_time_and_on_jsonl(model, tmp_path):
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps({"user": p, "body": f"{p} 说：太累了 {i}"}, ensure_ascii=False) + "\n"
                           for i in range(12) for p in ("x", "y")), encoding="utf-8")
    r = run("watch", src, "--by", "user", "--field", "body", "-o", tmp_path / "out", "--model", model, "-q",
            "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert "no --time: messages are taken in input order and the day-streak rule is off" in r.stderr
    assert len((tmp_path / "out" / "labels.jsonl").read_text(encoding="utf-8").splitlines()) == 24
    assert {p["person"] for p in read_csv(tmp_path / "out" / "people.csv")} == {"x", "y"}


def test_mistakes_are_one_line_errors(model, tmp_path):
    src = tmp_path / "m.csv"
    write_messages(src)
    for args, words in [(("--by", "who"), "no column 'who'"), (("--by", "author", "--window", "2"), "negatives"),
                        (("--by", "author", "--time", "text"), "no row has both a person and a readable time")]:
        r = run("watch", src, *args, "-o", tmp_path / "out", "--model", model)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr


# Stops the labelling at its third group of rows: reports PAUSED and waits on stdin, so the interruption lands
# after exactly two groups however fast the machine is.
PAUSING_WATCH = """
import sys
from allinone_gguf.runtime import AllInOne
real, calls = AllInOne.classify_many, []
def classify_many(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        print("PAUSED", file=sys.stderr, flush=True)
        sys.stdin.readline()
    return real(self, *args, **kwargs)
AllInOne.classify_many = classify_many
from allinone_gguf.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_watch_resumes_without_losing_or_repeating_a_row(model, tmp_path, how):
    src, out = tmp_path / "messages.csv", tmp_path / "out"
    rows = write_messages(src)
    args = ["watch", str(src), "--by", "author", "--time", "time", "-o", str(out), "--model", str(model), "-q",
            "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_WATCH, *args], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_it)
    try:
        for line in proc.stderr:                         # the event: two groups written, the third held
            if line.strip() == "PAUSED":
                break
        assert proc.poll() is None, "the watch ended before it could be interrupted"
        proc.send_signal(how)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if how == signal.SIGINT:
        assert proc.returncode == 130 and "rerun with --resume" in stderr, stderr
    before = (out / "labels.csv").read_bytes()
    assert before.count(b"\n") == 1 + 2 * BRANCHES and not (out / "alerts.csv").exists()
    r = run("watch", *args[1:], "--resume")
    assert r.returncode == 0, r.stderr
    assert f"{2 * BRANCHES} rows kept from the earlier run" in r.stdout
    assert (out / "labels.csv").read_bytes().startswith(before)                    # the earlier rows as written
    check_outputs(out, rows, AlertRule())                                          # every row once, in order


def test_the_ray_engine_gives_the_same_alerts_as_the_local_one(watched, model, tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:                                  # a failure, not a skip, as in test_ray.py
        pytest.fail("--engine ray needs the ray extra: make ray-env")
    out = tmp_path / "ray"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}     # the head listens on 127.0.0.1 only
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "watch", str(watched["src"]), "--by", "author",
                        "--time", "time", "-o", str(out), "--model", str(model), "-q", *ANY_NEGATIVE, "--engine",
                        "ray", "--address", "local", "--actors", "1", "--threads", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "labels" / "manifest.json").is_file()
    for name in ("alerts.csv", "people.csv"):
        assert (out / name).read_text(encoding="utf-8") == (watched["out"] / name).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ browser

@pytest.mark.browser
def test_report_opens_offline_in_chromium_with_a_chart_per_person(watched):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium fonts-noto-cjk (or deselect: -m 'not browser')")
    from playwright.sync_api import sync_playwright
    report = watched["out"] / "report.html"
    asked = []

    def route(r):
        if urlsplit(r.request.url).scheme == "file":
            r.continue_()
        else:
            asked.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900}, locale="zh-CN")
            context.route("**/*", route)
            context.on("websocket", lambda ws: asked.append(ws.url))
            page = context.new_page()
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            sections = page.locator("section.person")
            assert sections.count() == len(PEOPLE)
            assert page.locator("section.person svg.chart circle").count() == len(watched["rows"]) - 2
            assert "alert" in sections.first.get_attribute("class")                  # a person with an alert first
            box = page.locator("section.person svg.chart").first.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 60                 # drawn, not collapsed
            assert page.locator("section.person.alert .alertbox li").count() >= 1
            assert page.get_by_text("Bea <b>&", exact=True).count() >= 1             # escaped text reads as written
            assert page.evaluate("document.querySelectorAll('script, link, img, iframe').length") == 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "watch-report.png"), full_page=True)
        finally:
            browser.close()
    assert not asked, f"the report asked for {asked}"
