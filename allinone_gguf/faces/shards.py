"""Input files cut into shards, and the output shards and manifest of `classify --engine ray` (no Ray here).

A shard is a run of consecutive records of one input file: a byte range of a CSV / TSV / JSONL / text file or a
row range of a Parquet file. Planning reads every text file once with the same readers as the local `classify`
(rowio), so a shard holds exactly the records, line numbers and bad-row errors the local command sees. Each
shard becomes one output file, written whole under a temporary name and renamed, so a file that exists is
complete and a rerun with --resume skips it.

    >>> from allinone_gguf.faces.shards import expand_inputs, plan_shards
    >>> inputs, shards = plan_shards(expand_inputs(["reviews/*.csv"]), "auto", "text", None, 4096)  # doctest: +SKIP
"""
from __future__ import annotations

import codecs
import functools
import glob
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .rowio import (OUTPUT_COLUMNS, Record, RowWriter, detect_format, output_header, read_records, read_rows,
                    refuse_clash)
from .rules import RULE_COLUMNS

PARQUET_EXTENSIONS = (".parquet", ".pq")
TEXT_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".txt")
OUTPUT_FORMATS = ("csv", "jsonl", "parquet")
MANIFEST = "manifest.json"
SHARD_PREFIX = "part-"


@dataclass
class InputFile:
    path: str                      # absolute
    fmt: str                       # csv, tsv, jsonl, txt or parquet
    bytes: int
    mtime_ns: int
    rows: int = 0                  # records, bad ones included
    header: list[str] | None = None  # CSV/TSV column names
    header_end: int = 0            # byte offset where the records begin (after the header and a UTF-8 BOM)


@dataclass(frozen=True)
class Shard:
    index: int
    input: int                     # index into the inputs
    start: int                     # first byte (text files) or row (Parquet)
    end: int                       # one past the last byte or row
    first_line: int                # 1-based line (text) or row (Parquet) number where the shard begins
    rows: int                      # records in the shard


@dataclass(frozen=True)
class Chunk:
    """A few records of one shard: what one Ray task reads, and the unit retried when an actor dies."""
    shard: int
    input: int
    start: int
    end: int
    first_line: int
    rows: int
    seq: int                       # index in its shard of the chunk's first record


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named, the CSV/TSV/JSONL/text/Parquet files under folders (recursively), and glob matches; sorted
    within each argument, each file once. ValueError when an argument matches nothing."""
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in TEXT_EXTENSIONS + PARQUET_EXTENSIONS)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
        if not found:
            raise ValueError(f"{pattern}: no such file, and no input file in it or matching it")
        out += found
    seen: set[Path] = set()
    return [f for f in out if not (f.resolve() in seen or seen.add(f.resolve()))]


def input_format(path: Path, override: str = "auto", column: str = "text") -> str:
    if path.suffix.lower() in PARQUET_EXTENSIONS:
        return "parquet"
    if override != "auto":
        return override
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        return detect_format(str(path), f.readline(), column)


class _Lines:
    """The lines of a text file from byte `start` to byte `end`, as rowio reads them (surrogateescape, newlines
    kept), counting the bytes and lines handed out so far."""

    def __init__(self, path: str, start: int = 0, end: int | None = None):
        self.raw = open(path, "rb")
        self.raw.seek(start)
        if start == 0 and self.raw.read(3) != codecs.BOM_UTF8:
            self.raw.seek(0)
        self.pos, self.count, self.end = self.raw.tell(), 0, end
        self.text = io.TextIOWrapper(self.raw, encoding="utf-8", errors="surrogateescape", newline="")

    def __iter__(self) -> Iterator[str]:
        with self.text:
            for line in self.text:
                if self.end is not None and self.pos >= self.end:
                    return
                self.pos += len(line.encode("utf-8", "surrogateescape"))
                self.count += 1
                yield line


def _cut_text_file(f: InputFile, column: str, gold: str | None, every: int) -> tuple[list[tuple[int, int, int]], int]:
    """([(records before, byte, lines before) where every `every`-th record's lines begin], end byte)."""
    lines = _Lines(f.path)
    header, records = read_records(lines, f.fmt, column, gold)
    f.header, f.header_end = header, lines.pos
    # A record is yielded once its last line is read, so the position after one record is where the next
    # one's lines (blank ones too) begin.
    cuts, mark = [], (lines.pos, lines.count)
    for n, _ in enumerate(records):
        if n % every == 0:
            cuts.append((n, *mark))
        mark = (lines.pos, lines.count)
        f.rows = n + 1
    return cuts, lines.pos


def _cut_parquet_file(f: InputFile, column: str, gold: str | None, every: int) -> tuple[list[tuple[int, int, int]], int]:
    import pyarrow.parquet as pq
    names = pq.ParquetFile(f.path).schema_arrow.names
    for name, what in ((column, "--column"), (gold, "--gold")):
        if name is not None and name not in names:
            raise ValueError(f"no column {name!r} in the Parquet schema ({', '.join(names)}); pick one with {what}")
    refuse_clash(names, OUTPUT_COLUMNS)
    f.rows = pq.ParquetFile(f.path).metadata.num_rows
    return [(n, n, n) for n in range(0, f.rows, every)], f.rows


def plan_shards(paths: list[Path], fmt: str, column: str, gold: str | None, shard_rows: int,
                chunk_rows: int) -> tuple[list[InputFile], list[Shard], list[Chunk]]:
    """(inputs, shards, chunks): each file read once to find where every `chunk_rows`-th record begins; a shard
    is `shard_rows` records (a multiple of chunk_rows), the last of a file fewer.

    ValueError "PATH: why" for a file that cannot be read as its format (a missing column, no header)."""
    if shard_rows % chunk_rows:
        raise ValueError(f"shard_rows={shard_rows} must be a multiple of chunk_rows={chunk_rows}")
    inputs, shards, chunks = [], [], []
    for i, path in enumerate(paths):
        st = path.stat()
        f = InputFile(str(path.resolve()), input_format(path, fmt, column), st.st_size, st.st_mtime_ns)
        try:
            cuts, end = (_cut_parquet_file if f.fmt == "parquet" else _cut_text_file)(f, column, gold, chunk_rows)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        inputs.append(f)
        ends = [c[1] for c in cuts[1:]] + [end]
        file_chunks = [Chunk(len(shards) + n // shard_rows, i, start, stop, before + 1, min(chunk_rows, f.rows - n),
                             n % shard_rows) for (n, start, before), stop in zip(cuts, ends)]
        for index, group in itertools.groupby(file_chunks, key=lambda c: c.shard):
            group = list(group)
            shards.append(Shard(index, i, group[0].start, group[-1].end, group[0].first_line,
                                sum(c.rows for c in group)))
        chunks += file_chunks
    return inputs, shards, chunks


def _relined(rec: Record, delta: int) -> Record:
    """The record with its line number (and the "line N:" its error starts with) moved by `delta`."""
    old = f"line {rec.line}:"
    rec.line += delta
    if rec.error and rec.error.startswith(old):
        rec.error = f"line {rec.line}:" + rec.error[len(old):]
    return rec


def read_span(span: Shard | Chunk, f: InputFile, column: str, gold: str | None) -> Iterator[Record]:
    """The records of one shard or chunk, with the line numbers and errors of a whole-file read."""
    st = os.stat(f.path)
    if (st.st_size, st.st_mtime_ns) != (f.bytes, f.mtime_ns):
        raise RuntimeError(f"{f.path} changed since the run was planned; start a new run")
    if f.fmt == "parquet":
        yield from _read_parquet_span(span, f, column, gold)
        return
    lines: Iterator[str] = iter(_Lines(f.path, span.start, span.end))
    if f.header is not None:   # rowio numbers the first record line 2, after the header
        head = _Lines(f.path, 0, f.header_end)
        lines, delta = itertools.chain(head, lines), span.first_line - 2
    else:
        delta = span.first_line - 1
    _, records = read_records(lines, f.fmt, column, gold)
    yield from (_relined(rec, delta) for rec in records)


@functools.lru_cache(maxsize=1)
def _row_group(path: str, mtime_ns: int, group: int):
    """One row group of a Parquet file; kept, since the chunks a worker reads next usually lie in it too."""
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).read_row_group(group)


def _read_parquet_span(span: Shard | Chunk, f: InputFile, column: str, gold: str | None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    meta = pq.ParquetFile(f.path).metadata
    parts, at = [], 0     # the slices of the row groups that hold rows start..end
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        lo, hi = max(span.start, at), min(span.end, at + n)
        if lo < hi:
            parts.append(_row_group(f.path, f.mtime_ns, g).slice(lo - at, hi - lo))
        at += n
    table = pa.concat_tables(parts)
    for k, fields in enumerate(table.to_pylist()):
        row = span.start + k + 1
        text = fields.get(column)
        rec = Record(row, fields, text if isinstance(text, str) else "", fields.get(gold) if gold else None)
        if text is None or (isinstance(text, str) and not text.strip()):
            rec.error = f"row {row}: empty text"
        elif not isinstance(text, str):
            rec.error = f"row {row}: field {column!r} is not a string"
        yield rec


# ------------------------------------------------------------------------------------------- output files

def default_output_format(inputs: list[InputFile]) -> str:
    """Parquet for Parquet inputs, JSONL when any input is JSONL (its objects need not be flat), else CSV."""
    kinds = {f.fmt for f in inputs}
    if kinds == {"parquet"}:
        return "parquet"
    return "jsonl" if kinds & {"jsonl", "parquet"} else "csv"


def check_output_format(inputs: list[InputFile], out_fmt: str) -> None:
    if out_fmt == "csv" and any(f.fmt in ("jsonl", "parquet") for f in inputs):
        raise ValueError("JSONL and Parquet inputs are written as JSONL or Parquet: pick --output-format")


def shard_file(shard: Shard, out_fmt: str) -> str:
    return f"{SHARD_PREFIX}{shard.index:05d}.{out_fmt}"


def write_shard(path: Path, out_fmt: str, columns: list[str] | None, rows: list[dict]) -> None:
    """Write the rows of one shard under a temporary name, then rename it: an existing shard file is whole."""
    tmp = path.with_name(path.name + ".tmp")
    if out_fmt == "parquet":
        _write_parquet(tmp, rows)
    else:
        tmp.unlink(missing_ok=True)
        writer = RowWriter(str(tmp), out_fmt, columns)
        for row in rows:
            writer.write(row)
        writer.close()
    os.replace(tmp, path)


def read_shard(path: Path, fmt: str) -> list[dict]:
    """The rows of one shard file written by write_shard (CSV, JSONL or Parquet)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    return read_rows(str(path), fmt)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        table = pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # values of mixed types in one column (JSONL objects differ): every input column as JSON text
        keep = set(OUTPUT_COLUMNS) | set(RULE_COLUMNS)
        table = pa.Table.from_struct_array(pa.array(
            [{k: (v if k in keep else json.dumps(v, ensure_ascii=False)) for k, v in r.items()} for r in rows]))
    pq.write_table(table, path)


def output_columns(f: InputFile, column: str) -> list[str]:
    return output_header(f.header, column)


@dataclass
class Manifest:
    """What a run read, with which model and settings, and what it wrote (manifest.json in the output folder).

    `plan` fixes the output: a --resume run must have the same plan."""

    plan: dict
    engine: dict
    shards: list[dict] = field(default_factory=list)   # file, input, rows, first_line, start, end
    rows_in: int = 0
    rows_out: int = 0
    rows_error: int = 0
    duplicates_dropped: int = 0
    complete: bool = False
    seconds: float = 0.0

    def save(self, folder: Path) -> None:
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, folder / MANIFEST)

    @classmethod
    def load(cls, folder: Path) -> "Manifest | None":
        path = folder / MANIFEST
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def plan_record(inputs: list[InputFile], shards: list[Shard], **options) -> dict:
    """The part of the manifest a resumed run must match: inputs (size, time), shards and the given options."""
    plan = {"inputs": [asdict(f) for f in inputs], "shards": [asdict(s) for s in shards], **options}
    return json.loads(json.dumps(plan))   # as it reads back from manifest.json, so the two compare equal


def clear_output(folder: Path) -> None:
    """Remove what a run writes (shards, temporary files, the manifest), nothing else."""
    for p in folder.glob(SHARD_PREFIX + "*"):
        p.unlink()
    for name in (MANIFEST, MANIFEST + ".tmp"):
        (folder / name).unlink(missing_ok=True)
