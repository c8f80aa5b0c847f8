"""Rows in and out for batch classification: CSV / JSONL / plain-text readers, a row-by-row writer, resume.

Every input record becomes exactly one output row, in input order, so a run that stops after N rows is
continued by skipping the first N input records (`count_done`). Bad records (empty text, broken UTF-8,
a CSV line with the wrong number of fields, a JSONL line that is not an object) are not skipped: they
come back with `error` set ("line 7: ...") and are written like any other row.

    >>> import io
    >>> fmt = detect_format("reviews.csv")
    >>> header, recs = read_records(io.StringIO("label,text\\n1,好吃\\n0,\\n"), fmt, column="text")
    >>> [(r.line, r.text, r.error) for r in recs]
    [(2, '好吃', None), (3, '', 'line 3: empty text')]
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

FORMATS = ("csv", "tsv", "jsonl", "txt")
OUTPUT_COLUMNS = ("sentiment", "confidence", "error")  # appended to every input row
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
_BAD_BYTES = re.compile("[\udc80-\udcff]+")  # undecodable bytes, kept by errors="surrogateescape"


@dataclass
class Record:
    line: int                      # 1-based input line where the record starts
    fields: dict[str, object]      # the input row as it will be written (columns or JSON keys, in order)
    text: str = ""
    gold: object = None            # raw gold value, None when absent
    error: str | None = None       # "line N: why", for rows that are written but not classified


def detect_format(path: str, first_line: str = "", column: str = "text") -> str:
    """Format from the file extension; for stdin (`-`) or unknown extensions, from the first line."""
    ext = _EXTENSIONS.get(Path(path).suffix.lower()) if path != "-" else None
    if ext:
        return ext
    head = first_line.strip()
    if head.startswith("{"):
        return "jsonl"
    if column in next(csv.reader([head]), []) and "," in head:
        return "csv"
    if column in head.split("\t") and "\t" in head:
        return "tsv"
    return "txt"


def open_text(path: str) -> io.TextIOBase:
    """A text stream over a file or stdin that never fails on bad bytes (they become lone surrogates)."""
    if path == "-":
        import sys
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _clean(value: object) -> tuple[object, bool]:
    """(value with undecodable bytes shown as U+FFFD, whether there were any)."""
    if isinstance(value, str) and _BAD_BYTES.search(value):
        return _BAD_BYTES.sub("\ufffd", value), True
    return value, False


def _finish(rec: Record, column: str) -> Record:
    """Shared checks once a record's fields are known: encoding, then the text itself."""
    broken = False
    for key, value in rec.fields.items():
        rec.fields[key], bad = _clean(value)
        broken |= bad
    text = rec.fields.get(column)
    rec.text = "" if text is None else str(text)
    if rec.error:
        return rec
    if broken:
        rec.error = f"line {rec.line}: invalid UTF-8 (undecodable bytes shown as \ufffd)"
    elif not rec.text.strip():
        rec.error = f"line {rec.line}: empty text"
    return rec


def read_header(lines: Iterator[str], fmt: str, column: str, gold: str | None) -> list[str] | None:
    """The column names of a CSV/TSV stream (consuming the header line); None for JSONL and text."""
    if fmt not in ("csv", "tsv"):
        return None
    header = next(csv.reader(lines, delimiter="," if fmt == "csv" else "\t"), None)
    if not header:
        raise ValueError("the input is empty: expected a header line with column names")
    header = [_clean(h)[0] for h in header]
    for name, what in ((column, "--column"), (gold, "--gold")):
        if name is not None and name not in header:
            raise ValueError(f"no column {name!r} in the header ({', '.join(header)}); pick one with {what}")
    refuse_clash(header, OUTPUT_COLUMNS)
    return header


def refuse_clash(names, added, why: str = "") -> None:
    """ValueError when an input's column `names` already hold one the output adds (`added`): its values would be
    overwritten. `why` says who adds them."""
    clash = [c for c in added if c in (names or ())]
    if clash:
        raise ValueError(f"the input already has column(s) {', '.join(clash)}{why}; rename them first")


def read_records(stream: Iterable[str], fmt: str, column: str = "text",
                 gold: str | None = None) -> tuple[list[str] | None, Iterator[Record]]:
    """(CSV/TSV column names or None, the records) of a CSV/TSV (header line first), JSONL or text stream.

    The header is read at once, so a missing column is an error before any row is processed.
    """
    lines = iter(stream)
    if fmt in ("csv", "tsv"):
        header = read_header(lines, fmt, column, gold)
        return header, _csv_records(lines, fmt, header, column, gold, first_line=2)
    if fmt == "jsonl":
        return None, _jsonl_records(lines, column, gold)
    if fmt == "txt":
        if gold:
            raise ValueError("--gold needs a CSV or JSONL input: plain text has no label column")
        return None, (_finish(Record(n, {column: line.rstrip("\r\n")}), column) for n, line in enumerate(lines, 1))
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _csv_records(lines, fmt, header, column, gold, first_line) -> Iterator[Record]:
    reader = csv.reader(lines, delimiter="," if fmt == "csv" else "\t")
    start = first_line
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a quote never closed: the rest of the file is one field
            yield _finish(Record(start, dict.fromkeys(header, ""),
                                 error=f"line {start}: unreadable CSV ({exc})"), column)
            return
        line, start = start, first_line + reader.line_num  # line_num: lines this reader has consumed
        if not row:  # a blank line carries nothing
            continue
        rec = Record(line, dict(zip(header, row + [""] * (len(header) - len(row)))))
        if len(row) != len(header):
            rec.error = f"line {line}: expected {len(header)} fields, found {len(row)}"
            if len(row) > len(header):  # most often an unquoted comma in the text: keep every value
                rec.fields[header[-1]] = ("," if fmt == "csv" else "\t").join(row[len(header) - 1:])
        rec.gold = rec.fields.get(gold) if gold else None
        yield _finish(rec, column)


def _jsonl_records(lines, column, gold) -> Iterator[Record]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _finish(Record(n, {"input": line.rstrip("\r\n")}, error=f"line {n}: invalid JSON ({exc.msg})"),
                          column)
            continue
        if not isinstance(obj, dict):
            yield _finish(Record(n, {"input": obj}, error=f"line {n}: not a JSON object"), column)
            continue
        rec = Record(n, obj, gold=obj.get(gold) if gold else None)
        if column not in obj:
            rec.error = f"line {n}: no field {column!r}"
        elif not isinstance(obj[column], str):
            rec.error = f"line {n}: field {column!r} is not a string"
        yield _finish(rec, column)


class RowWriter:
    """Appends one output row per call and flushes it, so an interrupted run loses at most the row in flight.

    Each row goes out in one write, so a killed run leaves whole rows (plus, at worst, one cut-off row that
    `count_done` removes).
    """

    def __init__(self, path: str, fmt: str, header: list[str] | None):
        self.fmt, self.header = ("jsonl" if fmt == "jsonl" else "csv"), header
        # errors="replace": a lone surrogate left in a nested JSON value must not kill the run
        self.stream = (open(path, "a", encoding="utf-8", errors="replace", newline="") if path != "-" else
                       io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", errors="replace", newline=""))
        if self.fmt == "csv" and (path == "-" or self.stream.tell() == 0):
            self._write(self.header)

    def _write(self, values: list) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        self.stream.write(buf.getvalue())
        self.stream.flush()

    def write(self, row: dict) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.stream.flush()
        else:
            self._write(["" if row.get(c) is None else row[c] for c in self.header])

    def close(self) -> None:
        self.stream.close()


def output_header(input_header: list[str] | None, column: str) -> list[str]:
    """CSV output columns: the input's columns (or the text column for plain text) plus OUTPUT_COLUMNS."""
    return list(input_header or [column]) + list(OUTPUT_COLUMNS)


def count_done(path: str, fmt: str, header: list[str] | None) -> int:
    """How many whole rows an earlier run wrote to `path`; a cut-off last row is removed from the file.

    Raises ValueError when the file was written for other columns (a different input).
    """
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return 0
    data = p.read_bytes()
    keep, rows = 0, 0                    # byte length of the whole rows, their count
    if fmt == "jsonl":
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            keep, rows = keep + len(line), rows + 1
    else:
        ends = []
        offset = 0

        def lines():
            nonlocal offset
            for raw in data.splitlines(keepends=True):
                offset += len(raw)
                yield raw.decode("utf-8", errors="surrogateescape")

        reader = csv.reader(lines())
        try:
            for row in reader:
                ends.append((offset, row))
        except csv.Error:
            pass
        if not ends or ends[0][1] != header:
            found = ends[0][1] if ends else []
            raise ValueError(f"{path} has columns {found}, not {header}: it was written for another input "
                             "or with other options; pick another output file")
        keep = ends[0][0]
        for end, row in ends[1:]:
            if len(row) != len(header) or not data[:end].endswith(b"\n"):
                break
            keep, rows = end, rows + 1
    if keep < len(data):
        with open(p, "r+b") as f:
            f.truncate(keep)
    return rows


def read_rows(path: str, fmt: str) -> list[dict]:
    """Every row of an output file as dicts (CSV values stay strings)."""
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            return [json.loads(line) for line in f if line.strip()]
        return list(csv.DictReader(f))
