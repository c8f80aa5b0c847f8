"""`python -m allinone_gguf classify|chat`: readers and summaries (pure), chat logic (fake model), and the
real entry point in a subprocess on the tiny model (CSV, JSONL, text, stdin, bad rows, resume, sort, gold)."""
from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FakeRuntime, ctrl_c_reaches_it

from allinone_gguf.faces import classify_common, cli, flags
from allinone_gguf.runtime import BRANCHES
from allinone_gguf.runtime.config import Settings
from allinone_gguf.scoring import normalise_gold
from allinone_gguf.faces.rowio import count_done, detect_format, read_records

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"正面", "负面"}


def run(*args, stdin: str | bytes | None = None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m allinone_gguf ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "allinone_gguf", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, timeout=timeout, text=isinstance(stdin, str) or stdin is None)


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ pure: readers

@pytest.mark.parametrize("path, first, fmt", [
    ("a.csv", "", "csv"), ("a.TSV", "", "tsv"), ("a.jsonl", "", "jsonl"), ("a.txt", "", "txt"),
    ("-", '{"text": "x"}\n', "jsonl"), ("-", "label,text\n", "csv"), ("-", "label\ttext\n", "tsv"),
    ("-", "今天很好,但是\n", "txt"), ("notes", "hello\n", "txt"),
])
def test_detect_format(path, first, fmt):
    assert detect_format(path, first) == fmt


def test_csv_records_report_bad_rows_with_their_line_numbers():
    data = ('label,text\n1,好吃\n0,\n\n1,"两行\n的评论"\n0,太,难吃\n1\n'
            '0,坏\udcff字节\n')
    header, recs = read_records(io.StringIO(data, newline=""), "csv", "text", gold="label")
    recs = list(recs)
    assert header == ["label", "text"]
    got = [(r.line, r.text, r.error) for r in recs]
    assert got == [
        (2, "好吃", None),
        (3, "", "line 3: empty text"),
        (5, "两行\n的评论", None),                          # a quoted field over two lines; blank line 4 skipped
        (7, "太,难吃", "line 7: expected 2 fields, found 3"),  # the extra field is kept in the text column
        (8, "", "line 8: expected 2 fields, found 1"),
        (9, "坏\ufffd字节", "line 9: invalid UTF-8 (undecodable bytes shown as \ufffd)"),
    ]
    assert [r.gold for r in recs][:3] == ["1", "0", "1"]


def test_csv_header_problems_are_one_line_errors():
    with pytest.raises(ValueError, match="no column 'body'.*--column"):
        read_records(io.StringIO("label,text\n"), "csv", "body")
    with pytest.raises(ValueError, match="no column 'gold'.*--gold"):
        read_records(io.StringIO("label,text\n"), "csv", "text", gold="gold")
    with pytest.raises(ValueError, match="already has column.*sentiment"):
        read_records(io.StringIO("text,sentiment\n"), "csv", "text")
    with pytest.raises(ValueError, match="empty"):
        read_records(io.StringIO(""), "csv", "text")


def test_jsonl_records():
    data = '{"body": "好", "n": {"x": [1]}}\n{oops\n[1]\n{"n": 4}\n\n{"body": 5}\n{"body": " "}\n'
    _, recs = read_records(io.StringIO(data), "jsonl", "body")
    got = [(r.line, r.error) for r in recs]
    assert got == [(1, None), (2, "line 2: invalid JSON (Expecting property name enclosed in double quotes)"),
                   (3, "line 3: not a JSON object"), (4, "line 4: no field 'body'"),
                   (6, "line 6: field 'body' is not a string"), (7, "line 7: empty text")]


def test_text_records_keep_one_row_per_line():
    _, recs = read_records(io.StringIO("好\n\n坏\r\n"), "txt", "text")
    assert [(r.line, r.fields, r.error) for r in recs] == [
        (1, {"text": "好"}, None), (2, {"text": ""}, "line 2: empty text"), (3, {"text": "坏"}, None)]


def test_count_done_drops_a_cut_off_row_and_checks_the_header(tmp_path):
    out = tmp_path / "out.csv"
    whole = 'text,sentiment,confidence,error\n"a\nb",正面,0.9,\nc,负面,0.8,\n'
    out.write_bytes((whole + "d,正").encode())
    assert count_done(str(out), "csv", ["text", "sentiment", "confidence", "error"]) == 2
    assert out.read_text(encoding="utf-8") == whole
    with pytest.raises(ValueError, match="another input"):
        count_done(str(out), "csv", ["label", "text", "sentiment", "confidence", "error"])
    js = tmp_path / "out.jsonl"
    js.write_text('{"a": 1}\n{"a": 2}\n{"a"', encoding="utf-8")
    assert count_done(str(js), "jsonl", None) == 2
    assert js.read_text(encoding="utf-8") == '{"a": 1}\n{"a": 2}\n'


# --------------------------------------------------------------------------------- pure: sort, gold, flags

def test_priority_order_is_p_negative_descending_with_errors_last():
    rows = [{"id": 1, "sentiment": "正面", "confidence": "0.9"}, {"id": 2, "sentiment": "负面", "confidence": "0.6"},
            {"id": 3, "sentiment": None, "confidence": None, "error": "line 4: empty text"},
            {"id": 4, "sentiment": "Negative", "confidence": "0.99"}, {"id": 5, "sentiment": "正面", "confidence": "0.55"}]
    assert [r["id"] for r in sorted(rows, key=cli.priority_key)] == [4, 2, 5, 1, 3]


def test_gold_summary_on_given_predictions():
    rows = ([{"label": "1", "sentiment": "正面"}] * 3 + [{"label": "1", "sentiment": "负面"}]
            + [{"label": "negative", "sentiment": "负面"}] * 2 + [{"label": "0", "sentiment": "Positive"}]
            + [{"label": "0", "sentiment": None, "error": "line 9: empty text"}, {"label": "?", "sentiment": "正面"}])
    s, errors, unreadable = classify_common.gold_summary(rows, "label")
    assert (s.n, errors, unreadable) == (7, 1, 1)
    assert s.accuracy == pytest.approx(5 / 7)
    assert s.recall == {"正面": pytest.approx(3 / 4), "负面": pytest.approx(2 / 3)}
    assert s.confusion == {"正面": {"正面": 3, "负面": 1}, "负面": {"负面": 2, "正面": 1}}


def test_flags_default_to_settings():
    parser = cli.argparse.ArgumentParser()
    flags.add_settings_arguments(parser, cli.CHAT_SETTINGS)
    args = parser.parse_args([])
    assert flags.overrides(args, cli.CHAT_SETTINGS) == {}       # nothing given: Settings decides
    args = parser.parse_args(["--n-ctx", "1024", "--seed", "3", "--labels", "en", "--temperature", "0.2"])
    assert flags.overrides(args, cli.CHAT_SETTINGS) == {"n_ctx": 1024, "seed": 3, "labels": "en",
                                                        "temperature": 0.2}
    text = parser.format_help()
    assert f"(default: {Settings().max_tokens})" in text and f"(default: {Settings().temperature})" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--labels", "fr"])


def test_flags_from_any_frozen_dataclass_type_each_field():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        path: Path = dataclasses.field(default=Path("models"), metadata={"help": "a folder"})
        port: int = dataclasses.field(default=7860, metadata={"help": "a port"})
        ratio: float | None = None
        loud: bool = False

    parser = cli.argparse.ArgumentParser()
    flags.add_dataclass_arguments(parser, Knobs, None, "knobs")
    names = ["path", "port", "ratio", "loud"]
    args = parser.parse_args(["--path", "elsewhere", "--port", "8000", "--ratio", "0.5", "--loud"])
    assert Knobs(**flags.overrides(args, names)) == Knobs(Path("elsewhere"), 8000, 0.5, True)
    assert flags.overrides(parser.parse_args(["--no-loud"]), names) == {"loud": False}
    assert "a folder (default: models)" in parser.format_help()


def test_progress_total_counts_lines_without_parsing(tmp_path):
    f = tmp_path / "in.csv"
    f.write_bytes(b'label,text\n1,"two\nlines"\n0,bad \xff byte')   # no newline at the end
    assert cli.count_lines(str(f)) == 4 and cli.count_lines("-") is None
    f.write_bytes(b"")
    assert cli.count_lines(str(f)) == 0


def test_help_loads_neither_llama_cpp_nor_numpy_nor_gradio():
    code = ("import sys, contextlib, io\n"
            "from allinone_gguf.__main__ import build_parser\n"
            "from allinone_gguf.measure.evaluate import main as evaluate\n"
            "for argv, parse in ((['--help'], build_parser().parse_args), (['classify', '--help'], "
            "build_parser().parse_args), (['chat', '--help'], build_parser().parse_args), "
            "(['bench', '--help'], build_parser().parse_args), (['--help'], evaluate)):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        parse(argv)\n"
            "print(sorted({'llama_cpp', 'numpy', 'gradio', 'gguf', 'tqdm'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ------------------------------------------------------------------------------------ logic: chat on a fake

class FakeSentiment:
    def __init__(self, label):
        self.label, self.confidence, self.is_negative = label, 0.75, label == "负面"
        self.source = "grammar"


class FakeBot(FakeRuntime):
    """Queued replies; a reply may raise KeyboardInterrupt after some pieces (a user's Ctrl-C)."""

    def __init__(self, replies):
        self.replies, self.histories, self.closed_streams = list(replies), [], 0

    def respond(self, text, history=None):
        self.histories.append([dict(m) for m in history])
        pieces = self.replies.pop(0)
        bot = self

        class Stream:
            def __init__(self):
                self.closed = False
                self.pieces = iter(pieces)

            def sentiment(self):
                return FakeSentiment("负面" if "难过" in text else "正面")

            def __iter__(self):
                return self

            def __next__(self):
                p = next(self.pieces)
                if p is KeyboardInterrupt:
                    raise KeyboardInterrupt
                return p

            def close(self):
                if not self.closed:
                    self.closed = True
                    bot.closed_streams += 1
        return Stream()


def test_chat_keeps_history_stops_on_ctrl_c_and_resets():
    bot = FakeBot([["你", "好"], ["先", KeyboardInterrupt, "不会出现"], [KeyboardInterrupt], ["好的"], ["再见"]])
    lines = iter(["今天很开心", "我好难过", "还在吗", "", "谢谢", "/reset", "最后", "/exit", "never read"])
    out = io.StringIO()
    cli.chat_loop(bot, "zh", read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "😄 LLM 情感判断: 正面 (置信度 75%)\n你好\n" in text
    assert "😢 LLM 情感判断: 负面 (置信度 75%)\n先 [stopped]\n" in text and "不会出现" not in text
    assert bot.histories[1] == [{"role": "user", "content": "今天很开心"}, {"role": "assistant", "content": "你好"}]
    # the stopped reply stays as far as it got; a reply stopped before its first piece leaves no assistant turn
    assert bot.histories[2][-2:] == [{"role": "user", "content": "我好难过"}, {"role": "assistant", "content": "先"}]
    assert bot.histories[3][-2:] == [{"role": "assistant", "content": "先"}, {"role": "user", "content": "还在吗"}]
    assert bot.histories[4] == []                                          # after /reset
    assert bot.closed_streams == 5 and "(conversation forgotten)" in text
    assert next(lines) == "never read"                                      # /exit left the loop


def test_chat_ctrl_c_at_the_prompt_stays_and_end_of_input_leaves():
    calls = iter([KeyboardInterrupt, "hi"])

    def read(prompt):
        item = next(calls, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item
    out = io.StringIO()
    bot = FakeBot([["ok"]])
    cli.chat_loop(bot, "zh", read=read, out=out)
    assert "Ctrl-D leaves" in out.getvalue() and "ok" in out.getvalue()


# --------------------------------------------------------------------- behaviour: the real entry point

@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["Q4_K_M"]


def test_help_shows_settings_defaults():
    for command in ("classify", "chat"):
        r = run(command, "--help")
        assert r.returncode == 0
        assert f"(default: {Settings().n_ctx})" in " ".join(r.stdout.split())
    assert "--gold" in run("classify", "--help").stdout


def test_classify_csv_with_gold_prints_the_right_numbers(model, tmp_path):
    gold = ["1", "0", "1", "1", "0", "0", "正面", "negative"]
    texts = ["味道不错", "送餐太慢", "包装很用心", "下次还来", "菜是凉的", "分量太少", "服务很好", "再也不点了"]
    src = tmp_path / "in.csv"
    with open(src, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "text"])
        w.writerows([i, g, t] for i, (g, t) in enumerate(zip(gold, texts)))
    out = tmp_path / "out.csv"
    r = run("classify", src, "-o", out, "--gold", "label", "--model", model, "--n-threads", 1)
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert [(row["id"], row["label"], row["text"]) for row in rows] == [(str(i), g, t) for i, (g, t) in
                                                                           enumerate(zip(gold, texts))]
    assert all(row["sentiment"] in LABELS and 0.5 <= float(row["confidence"]) <= 1 and not row["error"]
               for row in rows)
    golds = [normalise_gold(g) for g in gold]
    preds = [row["sentiment"] for row in rows]
    correct = sum(g == p for g, p in zip(golds, preds))
    assert f"accuracy {correct / len(rows):.1%} on {len(rows)} rows" in r.stdout
    for label in ("正面", "负面"):
        n = golds.count(label)
        hits = sum(g == p == label for g, p in zip(golds, preds))
        assert f"{label} {hits / n:.1%}" in r.stdout
        row = [sum(g == label and p == q for g, p in zip(golds, preds)) for q in ("正面", "负面")]
        assert f"{label:<12}" + "  ".join(f"{c:>6}" for c in row) in r.stdout
    assert "texts/s" in r.stdout and "%|" in r.stderr                    # speed line; progress bar on stderr


def test_classify_bad_rows_are_reported_and_written(model, tmp_path):
    src = tmp_path / "bad.csv"
    src.write_bytes("label,text\n1,好吃\n0,\n1,a,b\n0,坏".encode() + b"\xff" + "字\n1,很好\n".encode())
    out = tmp_path / "bad.out.csv"
    r = run("classify", src, "-o", out, "--model", model, "-q")
    assert r.returncode == 0, r.stderr
    for line, why in ((3, "empty text"), (4, "expected 2 fields, found 3"), (5, "invalid UTF-8")):
        assert f"line {line}: {why}" in r.stderr
    assert "3 bad rows written with an error field (input lines 3, 4, 5)" in r.stdout
    rows = read_csv(out)
    assert [row["text"] for row in rows] == ["好吃", "", "a,b", "坏\ufffd字", "很好"]
    assert [bool(row["error"]) for row in rows] == [False, True, True, True, False]
    assert [row["sentiment"] in LABELS for row in rows] == [True, False, False, False, True]


def test_classify_jsonl_keeps_every_field(model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "body": "很满意", "meta": {"tags": ["a"]}}\n{broken\n{"id": 3, "body": "太失望了"}\n',
                   encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = run("classify", src, "-o", out, "--field", "body", "--model", model, "-q")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["meta"] == {"tags": ["a"]} and rows[0]["sentiment"] in LABELS and rows[0]["error"] is None
    assert rows[1]["error"].startswith("line 2: invalid JSON") and rows[1]["input"] == "{broken"
    assert rows[2]["id"] == 3 and rows[2]["sentiment"] in LABELS


def test_classify_text_from_stdin_to_stdout(model):
    r = run("classify", "-", "--model", model, stdin="今天很开心\n\n客服态度太差\n")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))                    # stdout holds only the CSV
    assert [row["text"] for row in rows] == ["今天很开心", "", "客服态度太差"]
    assert rows[1]["error"] == "line 2: empty text" and rows[0]["sentiment"] in LABELS
    assert "classified 2 texts" in r.stderr


def test_classify_sort_priority(model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("很好\n很差\n\n一般\n太棒了\n失望\n", encoding="utf-8")
    out = tmp_path / "sorted.csv"
    r = run("classify", src, "-o", out, "--sort", "priority", "--model", model, "-q")
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert len(rows) == 6 and not (tmp_path / "sorted.csv.part").exists()
    p_neg = [float(row["confidence"]) if row["sentiment"] == "负面" else 1 - float(row["confidence"])
             for row in rows[:-1]]
    assert p_neg == sorted(p_neg, reverse=True)
    assert rows[-1]["error"] == "line 3: empty text"


def test_existing_output_needs_resume_or_overwrite(model, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("keep me", encoding="utf-8")
    r = run("classify", "-", "-o", out, "--model", model, stdin="好\n")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--resume" in r.stderr and out.read_text(encoding="utf-8") == "keep me"
    r = run("classify", "-", "-o", out, "--model", tmp_path / "missing.gguf", "--overwrite", stdin="好\n")
    assert r.returncode == 2 and "make models" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sort", ["input", "priority"])
def test_resume_after_a_killed_run_loses_and_duplicates_nothing(model, tmp_path, sort):
    n = 400
    texts = [f"第{i}号评论：" + ("这家店的菜很好吃，服务也周到。" if i % 2 else "等了两个小时，菜都凉了。") * 3
             for i in range(n)]
    lines = io.StringIO()
    csv.writer(lines).writerows([["text"], *([t] for t in texts)])
    lines = lines.getvalue().splitlines(keepends=True)
    out = tmp_path / "out.csv"
    work = out.with_name("out.csv.part") if sort == "priority" else out
    # The first 40 rows come through a pipe that stays open: the run writes what it can, then waits for more
    # input, so the kill lands mid-run however fast the machine is.
    proc = subprocess.Popen([sys.executable, "-m", "allinone_gguf", "classify", "-", "--format", "csv", "-o", str(out),
                             "-q", "--sort", sort, "--model", str(model), "--n-threads", "1"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.stdin.write("".join(lines[:41]).encode("utf-8"))
        proc.stdin.flush()
        deadline = time.time() + 120        # two groups written and flushed: the event to wait on
        while time.time() < deadline and proc.poll() is None:
            if work.exists() and work.read_bytes().count(b"\n") >= 1 + 2 * BRANCHES:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    data = work.read_bytes()
    before = list(csv.DictReader(io.StringIO(data[:data.rfind(b"\n") + 1].decode("utf-8"), newline="")))
    src = tmp_path / "in.csv"
    src.write_text("".join(lines), encoding="utf-8")
    assert len(before) == 2 * BRANCHES
    r = run("classify", src, "-o", out, "--resume", "--sort", sort, "--model", model, "--n-threads", 1, "-q")
    assert r.returncode == 0, r.stderr
    assert f"{len(before)} rows kept from the earlier run" in r.stdout
    rows = read_csv(out)
    assert sorted(row["text"] for row in rows) == sorted(texts)           # nothing lost, nothing twice
    if sort == "input":
        assert [row["text"] for row in rows] == texts
        assert rows[:len(before)] == before                                # the earlier rows kept as written
    assert all(row["sentiment"] in LABELS for row in rows)
    assert not (tmp_path / "out.csv.part").exists()


def test_ctrl_c_stops_a_run_that_resume_finishes(model, tmp_path):
    # The texts come through a pipe that stays open: after the first 40 the run has classified what it could and
    # waits for more input, so Ctrl-C lands mid-run however fast the machine is (no race with the model's speed).
    texts = [f"消息{i}：今天的心情还不错，但是工作有点累。" * 4 for i in range(300)]
    out = tmp_path / "out.csv"
    proc = subprocess.Popen([sys.executable, "-m", "allinone_gguf", "classify", "-", "-o", str(out), "-q",
                             "--model", str(model), "--n-threads", "1"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            preexec_fn=ctrl_c_reaches_it)
    try:
        proc.stdin.write("".join(t + "\n" for t in texts[:40]))
        proc.stdin.flush()
        deadline = time.time() + 120       # two groups of BRANCHES rows written and flushed: the event to wait on
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 1 + 2 * BRANCHES:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "rerun with --resume" in err, err
    assert len(read_csv(out)) == 2 * BRANCHES                   # every row classified before Ctrl-C was kept
    r = run("classify", "-", "-o", out, "--resume", "--model", model, "-q", stdin="".join(t + "\n" for t in texts))
    assert r.returncode == 0, r.stderr
    assert [row["text"] for row in read_csv(out)] == texts


def test_chat_in_a_subprocess(model):
    r = run("chat", "--model", model, "--max-tokens", 8, "--seed", 1, stdin="今天很开心\n/reset\n太难过了\n/exit\n")
    assert r.returncode == 0, r.stderr
    badges = [line for line in r.stdout.splitlines() if "LLM 情感判断: " in line]
    assert len(badges) == 2 and all(("😄" in b) != ("😢" in b) for b in badges)
    assert "(conversation forgotten)" in r.stdout


def test_chat_ctrl_c_stops_the_reply_not_the_chat(model):
    proc = subprocess.Popen([sys.executable, "-m", "allinone_gguf", "chat", "--model", str(model), "--seed", "1",
                             "--max-tokens", "100000", "--n-ctx", "32768"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    seen = ""

    def read_until(marker: str, extra: int = 0) -> None:
        nonlocal seen
        start = len(seen)
        while marker not in seen[start:] or len(seen) - (seen.index(marker, start) + len(marker)) < extra:
            char = proc.stdout.read(1)
            assert char, f"chat ended early: {seen!r} {proc.stderr.read()}"
            seen += char

    try:
        for message in ("今天很开心", "再说一句"):     # a reply that could go on for thousands of tokens, stopped
            proc.stdin.write(message + "\n")
            proc.stdin.flush()
            read_until("LLM 情感判断", extra=40)           # the badge, then some of the reply
            proc.send_signal(signal.SIGINT)
            read_until("[stopped]")
        out, err = proc.communicate("/exit\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert seen.count("LLM 情感判断") == 2 and seen.count("[stopped]") == 2
