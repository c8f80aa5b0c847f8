"""`python -m allinone_gguf watch`: the wellbeing watch over a file of many people's messages (持续出现负面情绪
→ 预警): who has had a run of negative messages, since when, and which messages say so.

    python -m allinone_gguf watch messages.csv --by author --time time -o watch/
    python -m allinone_gguf watch messages.csv --by author --time time -o watch/ --resume       # after Ctrl-C
    python -m allinone_gguf watch 'exports/*.jsonl' --by user --time ts -o watch/ --engine ray --threads 1

Two stages. *Label*: every row goes through the classify command itself (cli.run_classify, local or Ray) into
DIR/labels.csv (DIR/labels.jsonl for JSONL input, the shard folder DIR/labels/ with --engine ray), row by row,
so an interrupted watch loses nothing and `--resume` continues it. *Aggregate* (pure, here): the rows are read
again with the classify command's own readers (for their line numbers), joined to their labels, grouped by
person, put in time order, and judged by allinone_gguf.wellbeing's AlertRule; out come alerts.csv, people.csv
and report.html (watch_report.py).

    >>> parse_time("2026-11-03 08:30"), parse_time("1793694600")
    ((datetime.datetime(2026, 11, 3, 8, 30), 1793694600.0), (datetime.datetime(2026, 11, 3, 8, 30), 1793694600.0))
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import re
import sys
from pathlib import Path

from ..scoring import NEGATIVE, normalise_gold
from ..wellbeing import Alert, AlertRule, Message, active_alert, alerts, counts, negative_share
from .classify_common import CLASSIFY_SETTINGS, UserError
from .cli import add_classify_parser, add_model_argument, run_classify
from .flags import add_dataclass_arguments, add_settings_arguments, overrides
from .ray_classify import add_engine_arguments
from .rowio import Record, read_rows

RULE_FIELDS = tuple(f.name for f in dataclasses.fields(AlertRule))
OUTPUTS = ("alerts.csv", "people.csv", "report.html")
SHOWN_BAD_ROWS = 20        # bad rows listed one by one; the rest are counted
_EPOCH = datetime.datetime(1970, 1, 1)
_UNIX = re.compile(r"[+-]?\d+(\.\d*)?")
_SLASHED = ("%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M", "%Y/%m/%d")


def _rule_words(r: AlertRule = AlertRule()) -> str:
    return (f"a message counts when it is 负面 with confidence >= --min-confidence ({r.min_confidence}); an alert "
            f"fires when --negatives ({r.negatives}) of the last --window ({r.window}) messages count, or when on "
            f"--streak-days ({r.streak_days}) calendar days in a row most of a day's messages count (needs --time; "
            "0 turns it off); it lasts while either holds")


_R = AlertRule()
DESCRIPTION = f"""\
Watch many people's messages for runs of negative sentiment. Each row of INPUT is one message: the person
(--by), the time (--time) and the text (--column), in CSV/TSV (header line first) or JSONL, as classify reads.

1. Label: every row is classified by the classify command's own machinery (the same --model, settings and
   --engine local|ray) into DIR/labels.csv (DIR/labels.jsonl for JSONL, the shard folder DIR/labels/ with
   --engine ray), one row at a time: an interrupted watch loses nothing, and rerunning it with --resume
   continues the labelling (once complete, --resume only redoes step 2, e.g. with other rule flags).
2. Alert, per person, messages in time order (input order without --time, and then the day rule is off):
   - a message counts when it is 负面 with confidence >= --min-confidence ({_R.min_confidence});
   - an alert fires when --negatives ({_R.negatives}) of the last --window ({_R.window}) messages count, or when on
     --streak-days ({_R.streak_days}) calendar days in a row most of a day's messages count (needs --time);
   - it lasts while either holds. Defaults from allinone_gguf.wellbeing.AlertRule.

Outputs in DIR:
  alerts.csv   one row per alert: person, since, until (times, and input lines), reason, and the messages that
               made it fire (rows of the labels, input lines, times, texts; JSON lists)
  people.csv   one row per person: messages, negatives, share negative, longest run of counting negatives,
               first and last message time, alerts, alert yes/no, alert still holding at the last message
  report.html  one page, offline (no script, no font, no link to fetch): people with alerts first, a chart per
               person (P(negative) per message, the rolling negative share, alert stretches shaded), and each
               alert with its messages

Times: ISO 8601 (2026-11-03T08:30:00+08:00, ...Z), 'YYYY-MM-DD HH:MM[:SS]', 'YYYY/MM/DD ...', a date alone, or
unix seconds (13 digits: milliseconds). Days are counted on the clock the time is written in; unix times are
UTC. A row with an unreadable time or an empty person is reported with its line number and left out of the
alerts; a row classify cannot label (empty text, ...) is in labels with its error.

example:
  python -m allinone_gguf watch messages.csv --by author --time time -o watch/
  python -m allinone_gguf watch messages.csv --by author --time time -o watch/ --resume --min-confidence 0.9
"""


def add_watch_parser(sub) -> None:
    p = sub.add_parser("watch", help="wellbeing watch: label many people's messages, alert on runs of negatives",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="+", help="CSV/TSV/JSONL file (--engine ray: files, folders, globs, Parquet)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for labels, alerts.csv, "
                                                                         "people.csv and report.html")
    p.add_argument("--by", required=True, metavar="COLUMN", help="column / field naming the person")
    p.add_argument("--time", metavar="COLUMN", help="column / field with the message's time (default: none: input "
                                                    "order, and the day-streak rule is off)")
    p.add_argument("--column", "--field", dest="column", default="text",
                   help="column / field holding the text (default: text)")
    p.add_argument("--format", choices=["auto", "csv", "tsv", "jsonl"], default="auto",
                   help="input format (default: from the extension)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted watch: keep the labels written")
    p.add_argument("--overwrite", action="store_true", help="label again from the start, replacing DIR's labels")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_dataclass_arguments(p, AlertRule, RULE_FIELDS, "alert rule (defaults from allinone_gguf.wellbeing.AlertRule)")
    add_model_argument(p)
    add_settings_arguments(p, CLASSIFY_SETTINGS)
    add_engine_arguments(p)
    p.set_defaults(func=run_watch)


# ------------------------------------------------------------------------------------------------ times

def parse_time(value) -> tuple[datetime.datetime, float]:
    """(the time as written, without its zone: days are counted on it; seconds since 1970 UTC, to order by: a
    time without a zone is read as UTC). ValueError when the value is not a time."""
    if isinstance(value, datetime.datetime):
        wall, zoned = value.replace(tzinfo=None), value
    elif isinstance(value, datetime.date):
        wall = zoned = datetime.datetime.combine(value, datetime.time())
    elif isinstance(value, (int, float)) and not isinstance(value, bool) or _UNIX.fullmatch(str(value).strip()):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"{value!r} is not a time")
        seconds = seconds / 1000 if abs(seconds) >= 1e11 else seconds     # 13 digits: JavaScript milliseconds
        try:
            wall = zoned = _EPOCH + datetime.timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{value!r} is out of range") from None
    else:
        text = str(value).strip()
        try:
            zoned = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" and text else text)
        except ValueError:
            for fmt in _SLASHED:
                try:
                    zoned = datetime.datetime.strptime(text, fmt)
                    break
                except ValueError:
                    pass
            else:
                raise ValueError(f"{value!r} is not a time") from None
        wall = zoned.replace(tzinfo=None)
    if zoned.tzinfo is None:
        zoned = zoned.replace(tzinfo=datetime.timezone.utc)
    return wall, zoned.timestamp()


# ------------------------------------------------------------------------------------------------ data

@dataclasses.dataclass
class Row:
    """One message, labelled."""
    n: int                          # 1-based row of the labels = record number over all inputs
    ref: int | str                  # where it is in the input: its line (row for Parquet), "b.csv:12" for several
    person: str
    wall: datetime.datetime | None  # as written; None without --time
    at: float                       # ordering key: UTC seconds, or n without --time
    text: str
    label: str                      # 正面 / 负面
    confidence: float               # of the label given, 0.5..1

    @property
    def p_negative(self) -> float:
        return self.confidence if self.label == NEGATIVE else 1.0 - self.confidence

    def when(self) -> str:
        return self.wall.isoformat(sep=" ") if self.wall else ""


@dataclasses.dataclass
class Person:
    name: str
    rows: list[Row]                 # in time order
    alerts: list[Alert]             # keys are Row.n
    share: list[float]              # rolling share of counting negatives per row
    counting: list[bool]            # per row: a counting negative under the rule
    active: bool                    # an alert still holds at the last message

    def longest_run(self) -> int:
        best = run = 0
        for c in self.counting:
            run = run + 1 if c else 0
            best = max(best, run)
        return best

    def summary(self) -> dict:
        negatives = sum(r.label == NEGATIVE for r in self.rows)
        return {"person": self.name, "messages": len(self.rows), "negatives": negatives,
                "counting_negatives": sum(self.counting), "share_negative": round(negatives / len(self.rows), 4),
                "longest_negative_run": self.longest_run(), "peak_rolling_share": max(self.share),
                "first_time": self.rows[0].when(), "last_time": self.rows[-1].when(), "alerts": len(self.alerts),
                "alert": "yes" if self.alerts else "no", "alert_now": "yes" if self.active else "no"}


def sort_people(people: list[Person]) -> list[Person]:
    """People with an alert first (one still holding first, then most alerts), then by share of negatives."""
    return sorted(people, key=lambda p: (not p.alerts, not p.active, -len(p.alerts),
                                         -sum(p.counting) / len(p.rows), p.name))


def watch_people(rows: list[Row], rule: AlertRule) -> list[Person]:
    """Group by person, order by time (ties in input order), judge by the rule."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.person, []).append(r)
    people = []
    for name, mine in by.items():
        mine.sort(key=lambda r: (r.at, r.n))
        msgs = [Message(r.n, r.wall, r.label == NEGATIVE, r.confidence) for r in mine]
        people.append(Person(name, mine, alerts(msgs, rule), negative_share(msgs, rule),
                             [counts(m, rule) for m in msgs], active_alert(msgs, rule) is not None))
    return sort_people(people)


def alert_rows(people: list[Person]) -> list[dict]:
    """alerts.csv: one row per alert, with the messages that made it fire."""
    out = []
    for p in people:
        at = {r.n: r for r in p.rows}
        for a in p.alerts:
            msgs = [at[k] for k in a.messages]
            out.append({"person": p.name, "since": at[a.since].when(), "until": at[a.until].when(),
                        "since_line": at[a.since].ref, "until_line": at[a.until].ref, "reason": a.reason,
                        "messages": len(msgs), "rows": json.dumps([m.n for m in msgs]),
                        "lines": json.dumps([m.ref for m in msgs]),
                        "times": json.dumps([m.when() for m in msgs], ensure_ascii=False),
                        "texts": json.dumps([m.text for m in msgs], ensure_ascii=False),
                        "confidences": json.dumps([round(m.confidence, 4) for m in msgs])})
    return out


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


ALERT_COLUMNS = ["person", "since", "until", "since_line", "until_line", "reason", "messages", "rows", "lines",
                 "times", "texts", "confidences"]
PEOPLE_COLUMNS = ["person", "messages", "negatives", "counting_negatives", "share_negative", "longest_negative_run",
                  "peak_rolling_share", "first_time", "last_time", "alerts", "alert", "alert_now"]


# ------------------------------------------------------------------------------------------------ the command

def read_inputs(args) -> tuple[list, list[tuple[str, Record]]]:
    """(InputFiles, [(file, record)] over all inputs in order), read as classify reads them."""
    from .shards import expand_inputs, plan_shards, read_span
    if "-" in args.input:
        raise UserError("watch reads files (twice: to label, then to join the labels); save stdin to a file first")
    if args.engine == "local" and len(args.input) > 1:
        raise UserError("the local engine reads one INPUT; --engine ray reads several files, folders or globs")
    if args.engine == "local" and not Path(args.input[0]).is_file():
        raise UserError(f"{args.input[0]}: no such file (--engine ray reads folders and globs)")
    try:
        paths = expand_inputs(args.input)
        inputs, shards, _ = plan_shards(paths, args.format, args.column, None, 1 << 30, 64)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for f in inputs:
        names = f.header
        if f.fmt == "parquet":
            if args.engine == "local":
                raise UserError(f"{f.path}: Parquet needs --engine ray")
            import pyarrow.parquet as pq
            names = pq.ParquetFile(f.path).schema_arrow.names
        if f.fmt == "txt":
            raise UserError(f"{f.path}: plain text has no person column; watch reads CSV/TSV/JSONL (--format)")
        for name, flag in ((args.by, "--by"), (args.time, "--time")):
            if names is not None and name is not None and name not in names:
                raise UserError(f"{f.path}: no column {name!r} ({', '.join(map(str, names))}); pick one with {flag}")
    return inputs, [(str(paths[s.input]), rec) for s in shards
                    for rec in read_span(s, inputs[s.input], args.column, None)]


def check_rows(records: list[tuple[str, Record]], args) -> tuple[dict[int, tuple], list[str]]:
    """({record index: (person, wall, at)} of the rows the alerts can use, ["line N: why"] of those they cannot).
    Rows classify cannot label (empty text, ...) are in neither: classify reports them."""
    good, bad = {}, []
    for i, (file, rec) in enumerate(records):
        if rec.error is not None:
            continue
        where = f"{file}: {'row' if file.lower().endswith(('.parquet', '.pq')) else 'line'} {rec.line}"
        person = rec.fields.get(args.by)
        if person is None or not str(person).strip():
            bad.append(f"{where}: empty person (--by {args.by})")
            continue
        wall, at = None, float(i + 1)
        if args.time:
            try:
                wall, at = parse_time(rec.fields.get(args.time))
            except (ValueError, TypeError, OverflowError):
                bad.append(f"{where}: unreadable time {rec.fields.get(args.time)!r} (--time {args.time})")
                continue
        good[i] = (str(person).strip(), wall, at)
    return good, bad


def classify_args(args, labels: Path) -> argparse.Namespace:
    """The classify command's arguments for the labelling: its own defaults (whatever flags it has), with
    the watch's input, model, settings and engine."""
    sub = argparse.ArgumentParser().add_subparsers()
    add_classify_parser(sub)
    ns = sub.choices["classify"].parse_args(["-"])
    shared = {k: v for k, v in vars(args).items() if k in vars(ns) and k != "func"}
    vars(ns).update(shared, output=str(labels), sort="input", gold=None)
    return ns


def labels_path(out: Path, inputs, engine: str) -> Path:
    if engine == "ray":
        return out / "labels"
    return out / ("labels.jsonl" if inputs[0].fmt == "jsonl" else "labels.csv")


def read_labels(path: Path) -> list[dict]:
    """The rows of DIR/labels.csv|.jsonl, or of the shards of DIR/labels/ in order."""
    if not path.is_dir():
        return read_rows(str(path), "jsonl" if path.suffix == ".jsonl" else "csv")
    from .shards import Manifest, Shard, read_shard, shard_file
    manifest = Manifest.load(path)
    fmt = manifest.plan["output_format"]
    return [row for s in manifest.plan["shards"] for row in read_shard(path / shard_file(Shard(**s), fmt), fmt)]


def join_labels(records, good, labels: list[dict], path: Path, column: str) -> tuple[list[Row], int]:
    """(Rows of the usable records with a label, records without a label). UserError when the labels were
    written for another input."""
    if len(labels) != len(records):
        raise UserError(f"{path} has {len(labels)} rows for {len(records)} input rows: written for another input; "
                        "--overwrite labels again")
    rows, unlabelled, several = [], 0, len({file for file, _ in records}) > 1
    for i, ((file, rec), lab) in enumerate(zip(records, labels)):
        if rec.error is None and isinstance(lab.get(column), str) and lab[column] != rec.text:
            raise UserError(f"{path}, row {i + 1}: the text differs from {file} line {rec.line}: written for "
                            "another input; --overwrite labels again")
        if i not in good:
            continue
        try:
            label, confidence = normalise_gold(lab.get("sentiment")), float(lab.get("confidence"))
        except (TypeError, ValueError):
            unlabelled += 1
            continue
        ref = f"{file}:{rec.line}" if several else rec.line
        rows.append(Row(i + 1, ref, good[i][0], good[i][1], good[i][2], rec.text, label, confidence))
    return rows, unlabelled


def run_watch(args) -> int:
    try:
        rule = AlertRule(**overrides(args, RULE_FIELDS))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not args.time and rule.streak_days:
        print("note: no --time: messages are taken in input order and the day-streak rule is off", file=sys.stderr)
        rule = dataclasses.replace(rule, streak_days=0)
    inputs, records = read_inputs(args)
    good, bad = check_rows(records, args)
    for line in bad[:SHOWN_BAD_ROWS]:
        print(f"{line}; left out of the alerts", file=sys.stderr)
    if len(bad) > SHOWN_BAD_ROWS:
        print(f"... and {len(bad) - SHOWN_BAD_ROWS} more rows left out of the alerts", file=sys.stderr)
    if records and not good and bad:
        raise UserError(f"no row has both a person and a readable time (e.g. {bad[0]}); check --by, --time")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; -o names a folder")
    out.mkdir(parents=True, exist_ok=True)
    labels = labels_path(out, inputs, args.engine)

    status = run_classify(classify_args(args, labels))     # the progress bar, resume, bad rows: classify's
    if status:
        return status
    rows, unlabelled = join_labels(records, good, read_labels(labels), labels, args.column)
    people = watch_people(rows, rule)
    write_csv(out / "alerts.csv", alert_rows(people), ALERT_COLUMNS)
    write_csv(out / "people.csv", [p.summary() for p in people], PEOPLE_COLUMNS)
    from .watch_report import write_report
    write_report(out / "report.html", people, rule, {
        "inputs": list(dict.fromkeys(file for file, _ in records)), "labels": str(labels),
        "model": Path(args.model).name, "rows": len(records), "bad": bad, "unlabelled": unlabelled,
        "times": bool(args.time), "rule": _rule_words(rule)})
    n_alerts, flagged = sum(len(p.alerts) for p in people), sum(bool(p.alerts) for p in people)
    print(f"{len(people)} people, {len(rows)} messages: {n_alerts} alert{'s' * (n_alerts != 1)} for {flagged} people "
          f"({sum(p.active for p in people)} still holding at their last message); {', '.join(OUTPUTS)} in {out}")
    left = len(bad) + unlabelled + sum(rec.error is not None for _, rec in records)
    if left:
        print(f"{left} rows left out of the alerts ({len(bad)} without a person or readable time, listed above; "
              f"{left - len(bad)} without a label, see {labels.name})")
    return 0
