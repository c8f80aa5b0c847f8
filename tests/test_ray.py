"""`classify --engine ray` (faces/ray_classify.py, faces/shards.py): shard planning against whole-file reads
(pure), then the real command on a real local Ray cluster started here (head on 127.0.0.1, 2 CPUs) with the tiny
model: the same answers as the local classify, bad rows reported, an actor killed mid-run, an interrupted run
resumed. Needs the `ray` extra (`make ray-env`); without it this module fails rather than skips."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray binds its head to the loopback address when this is 0 (as on macOS); set before Ray is imported, and
# inherited by every command the tests start, so nothing listens on or dials another interface.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
try:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
except ImportError as exc:   # a failure, not a skip: CI installs the extra
    raise ImportError(f"{exc}; tests/test_ray.py needs the ray extra: make ray-env") from None

from allinone_gguf.faces import ray_classify
from allinone_gguf.faces.rowio import open_text, read_records
from allinone_gguf.faces.shards import expand_inputs, plan_shards, read_span

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"正面", "负面"}
ACTOR_TITLE = b"ray::MapWorker(MapBatches(_Classifier))"


def classify(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allinone_gguf", "classify", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def start_classify(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "allinone_gguf", "classify", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# How long a test waits for an event the run reports (a shard on disk, a new actor) before it fails: generous, so a
# loaded machine (CI beside other jobs) is slow, not red; the events themselves come in seconds on a quiet one.
EVENT_WAIT_S = 600


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.2)


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("part-*") if not p.name.endswith(".tmp"))


def read_output(folder: Path) -> list[dict]:
    rows = []
    for p in shard_files(folder):
        if p.suffix == ".parquet":
            rows += pq.read_table(p).to_pylist()
        elif p.suffix == ".jsonl":
            rows += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
        else:
            rows += list(csv.DictReader(io.StringIO(p.read_text(encoding="utf-8"), newline="")))
    return rows


def write_csv(path: Path, n: int, bad: bool = False) -> None:
    """id,text rows; with `bad`, three bad rows after ids 5 and 70 (lines 8, 9 and 75)."""
    lines = [b"id,text\n"]
    for i in range(n):
        lines.append(f"{i},第{i}条：{'菜很好吃，送得也快' if i % 3 else '太难吃了，送餐还慢'}\n".encode())
        if bad and i == 5:
            lines += ["bad1,\n".encode(), "bad2,太,难吃\n".encode()]    # empty text; one field too many
        if bad and i == 70:
            lines.append("bad3,坏".encode() + b"\xff\n")                  # not UTF-8
    path.write_bytes(b"".join(lines))


def descendants_of_me() -> set[int]:
    """Process ids below this one (Ray's raylet and its workers were started by ray.init here)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    mine, grew = {os.getpid()}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in mine} - mine
        mine |= new
        grew = bool(new)
    return mine - {os.getpid()}


def classifier_actors() -> list[int]:
    out = []
    for pid in descendants_of_me():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(ACTOR_TITLE):
                out.append(pid)
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 with 2 CPUs, started by this process; its address for --address."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["Q4_K_M"]


# ---------------------------------------------------------------------------------------- pure: planning

TRICKY_CSV = ('\ufefflabel,text\r\n1,好吃\r\n0,\r\n\r\n1,"两行\r\n的评论"\r\n0,太,难吃\n1\n0,坏'.encode()
              + b"\xff" + '字节\n1,ok\n\n\n0,"no closing quote\n1,x\n'.encode())
TRICKY_JSONL = '{"text": "好", "n": {"x": [1]}}\n{oops\n[1]\n{"n": 4}\n\n{"text": 5}\n{"text": " "}\n{"text":"a"}\n'


@pytest.mark.parametrize("name, data", [("t.csv", TRICKY_CSV), ("t.jsonl", TRICKY_JSONL.encode()),
                                        ("t.txt", b"a\n\nb\r\nc\n")])
@pytest.mark.parametrize("chunk_rows, shard_rows", [(1, 1), (1, 2), (2, 4), (3, 3), (64, 4096)])
def test_shards_hold_exactly_the_records_of_a_whole_file_read(tmp_path, name, data, chunk_rows, shard_rows):
    path = tmp_path / name
    path.write_bytes(data)
    fmt = {"t.csv": "csv", "t.jsonl": "jsonl", "t.txt": "txt"}[name]
    with open_text(str(path)) as f:
        whole = [(r.line, r.text, r.error, r.fields) for r in read_records(f, fmt, "text", None)[1]]
    inputs, shards, chunks = plan_shards([path], "auto", "text", None, shard_rows, chunk_rows)
    assert inputs[0].rows == len(whole) == sum(s.rows for s in shards) == sum(c.rows for c in chunks)
    by_shard = [[(r.line, r.text, r.error, r.fields) for r in read_span(s, inputs[0], "text", None)] for s in shards]
    by_chunk = [(r.line, r.text, r.error, r.fields) for c in chunks for r in read_span(c, inputs[0], "text", None)]
    assert [x for s in by_shard for x in s] == by_chunk == whole
    assert [len(s) for s in by_shard] == [s.rows for s in shards]
    assert all(c.seq == sum(x.rows for x in chunks[:k] if x.shard == c.shard) for k, c in enumerate(chunks))


def test_parquet_spans_cross_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    texts = [f"text {i}" for i in range(50)]
    texts[7], texts[8] = "", None
    pq.write_table(pa.table({"id": list(range(50)), "text": texts}), path, row_group_size=12)
    inputs, shards, chunks = plan_shards([path], "auto", "text", None, 20, 4)
    recs = [r for c in chunks for r in read_span(c, inputs[0], "text", None)]
    assert [r.fields["id"] for r in recs] == list(range(50))
    assert [(r.line, r.error) for r in recs if r.error] == [(8, "row 8: empty text"), (9, "row 9: empty text")]
    assert [s.rows for s in shards] == [20, 20, 10]


def test_expand_inputs_takes_files_folders_and_globs_once(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("d/a.csv", "d/b.jsonl", "d/notes.md", "c.parquet"):
        (tmp_path / name).write_text("x")
    got = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d/a.csv"), str(tmp_path / "*.parquet")])
    assert [p.name for p in got] == ["a.csv", "b.jsonl", "c.parquet"]
    with pytest.raises(ValueError, match="no such file"):
        expand_inputs([str(tmp_path / "nothing*.csv")])


def test_a_wrong_model_copy_is_refused_before_the_actor_serves(model, tmp_path):
    with pytest.raises(ray_classify.ModelMismatch, match="another sha256"):
        ray_classify._Classifier(str(model), "0" * 64, {})
    with pytest.raises(ray_classify.ModelMismatch, match="not found on node"):
        ray_classify._Classifier(str(tmp_path / "missing.gguf"), "0" * 64, {})


def test_user_mistakes_are_one_line_errors(model, tmp_path):
    write_csv(tmp_path / "a.csv", 3)
    r = classify(tmp_path / "a.csv", "--actors", "2", "-o", tmp_path / "o.csv", "--model", model)
    assert r.returncode == 2 and r.stderr.strip() == "error: --actors need --engine ray"
    r = classify(tmp_path / "a.csv", tmp_path / "a.csv", "-o", tmp_path / "o.csv", "--model", model)
    assert r.returncode == 2 and "local engine reads one INPUT" in r.stderr
    r = classify(tmp_path / "a.csv", "--engine", "ray", "--shard-rows", "100", "-o", tmp_path / "o", "--model", model)
    assert r.returncode == 2 and f"multiple of {ray_classify.ROWS_PER_BLOCK}" in r.stderr
    # a model whose bytes differ from its manifest.json is refused before Ray starts
    copy = tmp_path / "m" / model.name
    copy.parent.mkdir()
    shutil.copy(model, copy)
    manifest = json.loads((model.parent / "manifest.json").read_text())
    manifest["outputs"]["Q4_K_M"]["sha256"] = "0" * 64
    (copy.parent / "manifest.json").write_text(json.dumps(manifest))
    r = classify(tmp_path / "a.csv", "--engine", "ray", "-o", tmp_path / "o", "--model", copy)
    assert r.returncode == 2 and "sha256 differs" in r.stderr and "Traceback" not in r.stderr


def test_without_ray_the_message_says_how_to_get_it(model, tmp_path):
    write_csv(tmp_path / "a.csv", 3)
    code = ("import sys; sys.modules['ray'] = None\n"
            "from allinone_gguf.__main__ import main\n"
            f"sys.exit(main(['classify', {str(tmp_path / 'a.csv')!r}, '--engine', 'ray', '-o', "
            f"{str(tmp_path / 'o')!r}, '--model', {str(model)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {ray_classify.INSTALL_HINT}"


# ----------------------------------------------------------------------------- a real cluster, tiny model

# Equal to the last digit needs every text decoded where it stands: with the sentiment cache an actor answers a.csv's
# texts again in c.parquet from their first decode, made in a batch of other texts, and batch composition moves a
# confidence by up to ~1e-3 (0.5017 against 0.5026 on the tiny model), so these comparisons turn the cache off.
NO_CACHE = ("--sentiment-cache", "0")


def test_same_answers_as_local_classify_and_bad_rows_reported(ray_head, model, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    write_csv(data / "a.csv", 150, bad=True)
    with open(data / "b.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"第{i}条：还行吧", "meta": {"i": i}}, ensure_ascii=False) + "\n")
        f.write('{"text": ""}\n{oops\n')
    write_csv(tmp_path / "c.csv", 150)                       # c.parquet holds the same rows
    with open(tmp_path / "c.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), data / "c.parquet",
                   row_group_size=50)

    local = {}
    for name in ("in/a.csv", "in/b.jsonl", "c.csv"):
        result = tmp_path / f"{Path(name).name}.out.jsonl"
        r = classify(tmp_path / name, "-o", result, "--model", model, "--threads", "1", "-q", *NO_CACHE)
        assert r.returncode == 0, r.stderr
        local[Path(name).name] = read_output_file(result)

    out = tmp_path / "out"
    r = classify(str(data / "*"), "-o", out, "--engine", "ray", "--address", ray_head, "--actors", "2",
                 "--threads", "1", "--shard-rows", "64", "--model", model, *NO_CACHE)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    files = [Path(f["path"]).name for f in manifest["plan"]["inputs"]]
    assert files == ["a.csv", "b.jsonl", "c.parquet"]
    by_input = {name: [] for name in files}
    for shard in manifest["plan"]["shards"]:    # JSONL shards, as a JSONL input is among the inputs
        by_input[files[shard["input"]]] += read_output_file(out / f"part-{shard['index']:05d}.jsonl")

    assert by_input["a.csv"] == local["a.csv"]      # every column, labels and confidences, errors
    assert by_input["b.jsonl"] == local["b.jsonl"]
    assert by_input["c.parquet"] == local["c.csv"]

    errors = [r["error"] for rows in by_input.values() for r in rows if r["error"]]
    assert errors == ["line 8: empty text", "line 9: expected 2 fields, found 3",
                      "line 75: invalid UTF-8 (undecodable bytes shown as \ufffd)",
                      "line 41: empty text",
                      "line 42: invalid JSON (Expecting property name enclosed in double quotes)"]
    for e in errors:
        assert e in r.stderr
    assert {r["sentiment"] for rows in by_input.values() for r in rows if not r["error"]} <= LABELS
    assert manifest["rows_in"] == manifest["rows_out"] == 153 + 42 + 150
    assert manifest["rows_error"] == len(errors) and manifest["complete"] and manifest["duplicates_dropped"] == 0
    listed = json.loads((model.parent / "manifest.json").read_text())["outputs"]["Q4_K_M"]["sha256"]
    assert manifest["plan"]["model"]["sha256"] == listed
    assert manifest["engine"]["actors"] == 2 and manifest["engine"]["threads"] == 1


def test_an_actor_whose_model_differs_refuses_to_serve(ray_head, model, tmp_path):
    write_csv(tmp_path / "a.csv", 20)
    inputs, _, chunks = plan_shards([tmp_path / "a.csv"], "auto", "text", None, 64, 64)
    args = type("Args", (), {"column": "text", "gold": None})
    ds = ray_classify._pipeline(ray, chunks, inputs, args, str(model), "0" * 64, {"n_threads": 1},
                                ray_classify.RaySettings(), 1, 1)
    with pytest.raises(ray.exceptions.RayError) as failed:
        ds.take_all()
    assert "another sha256 than 000000000000...; copy the same file to every node" in \
        ray_classify._ray_error(failed.value)


def read_output_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


def test_an_actor_killed_mid_run_loses_nothing_and_repeats_nothing(ray_head, model, tmp_path):
    write_csv(tmp_path / "big.csv", 3000)
    out = tmp_path / "out"
    proc = start_classify(tmp_path / "big.csv", "-o", out, "--engine", "ray", "--address", ray_head, "--actors", "2",
                          "--threads", "1", "--shard-rows", "256", "--model", model)
    try:
        wait_for(lambda: shard_files(out) or proc.poll() is not None, EVENT_WAIT_S, "the first shard")
        actors = classifier_actors()
        assert proc.poll() is None and len(shard_files(out)) < 12 and actors, "the run ended before the kill"
        os.kill(actors[0], signal.SIGKILL)
        # Ray starts a new actor process in its place (and retries the block it held)
        wait_for(lambda: set(classifier_actors()) - set(actors) or proc.poll() is not None, EVENT_WAIT_S, "a new actor")
        restarted = bool(set(classifier_actors()) - set(actors))
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert restarted
    ids = [r["id"] for r in read_output(out)]
    assert sorted(ids, key=int) == [str(i) for i in range(3000)]    # every row once
    assert ids == [str(i) for i in range(3000)]                     # and in input order
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_out"] == 3000


def test_an_interrupted_run_is_resumed(ray_head, model, tmp_path):
    write_csv(tmp_path / "big.csv", 2000)
    out = tmp_path / "out"
    args = (tmp_path / "big.csv", "-o", out, "--engine", "ray", "--address", ray_head, "--actors", "1",
            "--threads", "2", "--shard-rows", "128", "--model", model)
    proc = start_classify(*args)
    try:
        wait_for(lambda: len(shard_files(out)) >= 2 or proc.poll() is not None, EVENT_WAIT_S, "two shards")
        proc.send_signal(signal.SIGKILL)     # the hardest interruption: no clean-up at all
        proc.wait(timeout=30)
    finally:
        proc.kill()
    before = {p.name: p.read_bytes() for p in shard_files(out)}
    assert 2 <= len(before) < 16, "the run ended before the interruption"

    r = classify(*args)
    assert r.returncode == 2 and "--resume continues it" in r.stderr
    r = classify(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"{len(before)} shards kept from the earlier run" in r.stdout
    assert all((out / name).read_bytes() == data for name, data in before.items())   # kept, not redone
    assert [r["id"] for r in read_output(out)] == [str(i) for i in range(2000)]
    assert not list(out.glob("*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_in"] == manifest["rows_out"] == 2000
