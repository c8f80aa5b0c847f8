"""Measuring the wellbeing watch: a file of many people's messages to watch, and a check of what the watch wrote.

    python -m allinone_gguf.measure.watch_data make /tmp/watch-in.csv --rows 10000 --people 200 --days 30
    python -m allinone_gguf watch /tmp/watch-in.csv --by person --time time -o /tmp/watch-out --threads 1 --model M
    python -m allinone_gguf.measure.watch_data check /tmp/watch-in.csv /tmp/watch-out

`make` draws the texts from the dev sets (../shared/data/sentiment/*.dev200.csv, 600 正面 and 600 负面 texts, so
each comes back several times in 10,000 rows) and writes them outside the project (nothing is copied in). Each
person gets a share of the rows at times spread over --days; most messages are 正面 (a 负面 one with probability
--background-negative), and --planted people get one run of 6-10 consecutive 负面 messages. Columns: person, time,
text, label (the data set's 1/0) and planted (1 for a message of a planted run).

`check` reads DIR/labels.csv, alerts.csv and people.csv and verifies that every alert is explained by its messages
(each exists in the labels, is the person's, is 负面 with confidence >= the rule's bar, and there are at least
`negatives` of them), then counts how many planted people were alerted and how many others were. JSON on stdout.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import random
import sys
from pathlib import Path

from ..paths import SHARED_DATA
from ..scoring import NEGATIVE, POSITIVE, read_labeled_csv
from ..wellbeing import AlertRule

START = datetime.datetime(2026, 11, 1)


def dev_texts(folder: Path = SHARED_DATA) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {POSITIVE: [], NEGATIVE: []}
    for path in sorted(folder.glob("*.dev200.csv")):
        for label, text in read_labeled_csv(path, empty="skip"):
            texts[label].append(text)
    if not texts[NEGATIVE]:
        raise SystemExit(f"no *.dev200.csv under {folder}")
    return texts


def make_rows(rows: int, people: int, days: int, planted: int, background_negative: float, seed: int) -> list[dict]:
    """The messages, in time order over everyone (as an export would list them)."""
    rng = random.Random(seed)
    texts = dev_texts()
    names = [f"user{k:03d}" for k in range(people)]
    weights = [rng.uniform(0.5, 1.5) for _ in names]        # some people write more than others
    owner = rng.choices(range(people), weights, k=rows)
    span = days * 86400
    mine: dict[int, list[float]] = {}
    for k in owner:
        mine.setdefault(k, []).append(rng.uniform(0, span))
    run_people = set(rng.sample(sorted(mine), min(planted, len(mine))))
    out = []
    for k, seconds in mine.items():
        seconds.sort()
        run = range(0)
        if k in run_people:
            length = min(len(seconds), rng.randint(6, 10))
            first = rng.randrange(0, len(seconds) - length + 1)
            run = range(first, first + length)
        for i, s in enumerate(seconds):
            negative = i in run or rng.random() < background_negative
            label = NEGATIVE if negative else POSITIVE
            out.append({"person": names[k], "time": (START + datetime.timedelta(seconds=round(s))).isoformat(sep=" "),
                        "text": rng.choice(texts[label]), "label": int(label == POSITIVE), "planted": int(i in run)})
    out.sort(key=lambda r: r["time"])
    return out


def read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def check(src: Path, out: Path, rule: AlertRule) -> dict:
    """Every alert explained by its messages (AssertionError naming the first that is not), and the counts."""
    labels, found, people = read(out / "labels.csv"), read(out / "alerts.csv"), read(out / "people.csv")
    planted = {r["person"] for r in read(src) if r["planted"] == "1"}
    explained, gold_negative, messages = 0, 0, 0
    for a in found:
        refs, texts = json.loads(a["rows"]), json.loads(a["texts"])
        assert len(refs) >= rule.negatives and len(refs) == len(texts), a
        for n, text in zip(refs, texts):
            row = labels[n - 1]
            assert row["person"] == a["person"] and row["text"] == text, (a["person"], n)
            assert row["sentiment"] == NEGATIVE and float(row["confidence"]) >= rule.min_confidence, (a["person"], n)
            gold_negative += row["label"] == "0"
            messages += 1
        explained += 1
    alerted = {p["person"] for p in people if p["alert"] == "yes"}
    return {"rows": len(labels), "people": len(people), "alerts": len(found), "alerts_explained": explained,
            "people_alerted": len(alerted), "planted_people": len(planted),
            "planted_people_alerted": len(alerted & planted), "other_people_alerted": len(alerted - planted),
            "alert_messages": messages, "alert_messages_gold_negative": gold_negative,
            "rows_labelled_negative": sum(r["sentiment"] == NEGATIVE for r in labels),
            "rows_gold_negative": sum(r["label"] == "0" for r in labels)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone_gguf.measure.watch_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make", help="write the messages CSV")
    m.add_argument("output", type=Path)
    m.add_argument("--rows", type=int, default=10000)
    m.add_argument("--people", type=int, default=200)
    m.add_argument("--days", type=int, default=30)
    m.add_argument("--planted", type=int, default=20, help="people given a run of 6-10 negative messages")
    m.add_argument("--background-negative", type=float, default=0.1, help="chance any other message is 负面")
    m.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="verify a watch's alerts against its labels; counts as JSON")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path, help="the watch's -o DIR (run with the default rule)")
    args = p.parse_args(argv)
    if args.what == "make":
        rows = make_rows(args.rows, args.people, args.days, args.planted, args.background_negative, args.seed)
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, ["person", "time", "text", "label", "planted"], lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        print(f"{len(rows)} messages from {len({r['person'] for r in rows})} people in {args.output}", file=sys.stderr)
        return 0
    print(json.dumps(check(args.input, args.output, AlertRule()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
