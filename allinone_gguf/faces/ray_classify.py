"""`classify --engine ray`: the classify command as a Ray Data pipeline, one model per actor, for corpora that
outgrow one machine.

    python -m allinone_gguf classify 'corpus/*.csv' -o scored/ --engine ray --actors 2 --threads 1
    python -m allinone_gguf classify corpus/ -o scored/ --engine ray --address 10.0.0.1:6379 --resume

The driver (this process) cuts the inputs into shards (shards.py) and runs
    chunks of 64 rows -> read each on this node (rowio's readers) -> map_batches(_Classifier) on any node
where each of `--actors` actors holds one AllInOne with `--threads` llama.cpp threads and asks for as many CPUs.
The driver collects the rows, writes each shard once all its rows are in, and keeps each (shard, row) once:
every input row comes out exactly once, in input order within its shard. `--rules` (faces/rules.py) are matched
on the driver as the rows come in (regular expressions are light next to the model); the rules file's sha256
joins the plan --resume checks. Inputs and output stay on the driver's machine; the model must be at the same
path on every node (its sha256 is checked there). An actor that dies is restarted by Ray and its block retried
(max_restarts / max_task_retries); `--resume` skips the shard files already written.
Ray is an optional extra: `pip install -e '.[ray]'` or `make ray-env`.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from convert.defaults import MANIFEST as MODELS_MANIFEST

from ..runtime.config import Settings
from .classify_common import CLASSIFY_SETTINGS, classify_group, print_gold
from .flags import add_dataclass_arguments, overrides
from .rowio import refuse_clash
from .rules import RULE_COLUMNS, RuleSet, row_columns
from .shards import (MANIFEST, OUTPUT_FORMATS, SHARD_PREFIX, Chunk, InputFile, Manifest, Shard,
                     check_output_format, clear_output, default_output_format, expand_inputs, output_columns,
                     plan_record, plan_shards, read_shard, read_span, shard_file, write_shard)

INSTALL_HINT = "--engine ray needs Ray: pip install -e '.[ray]' (or: make ray-env)"
ROWS_PER_BLOCK = 64        # rows in one actor task: the unit Ray retries when an actor dies
READERS = 4                # reading tasks at a time: each reads a block in milliseconds, far ahead of the models


@dataclass(frozen=True)
class RaySettings:
    """The Ray engine's knobs; `classify --engine ray` derives its flags from these fields."""

    address: str | None = field(default=None, metadata={
        "help": "Ray cluster: HOST:PORT of a head started with `ray start --head`, `auto`, or `local` for a new "
                "one-machine cluster; none = RAY_ADDRESS, else the cluster last started here, else a new one"})
    actors: int | None = field(default=None, metadata={
        "help": "model copies (Ray actors), each loaded once; none = the cluster's CPUs // --threads"})
    shard_rows: int = field(default=4096, metadata={
        "help": f"input rows per output shard, a multiple of {ROWS_PER_BLOCK} (the rows of one Ray task); "
                "--resume keeps whole shards"})
    output_format: str | None = field(default=None, metadata={
        "help": "shard files: csv, jsonl or parquet; none = parquet for Parquet inputs, jsonl when any input "
                "is JSONL, else csv"})
    max_restarts: int = field(default=-1, metadata={
        "help": "times Ray restarts an actor that died (-1 = every time)"})
    max_task_retries: int = field(default=3, metadata={
        "help": "times a block whose actor died is retried; past that the run stops (rerun with --resume), "
                "so a row that kills the model every time cannot loop forever"})

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--actors must be at least 1, not {self.actors}")
        # Whole Ray tasks per shard (plan_shards cuts both); a task's rows reach the model BRANCHES at a time.
        if self.shard_rows < ROWS_PER_BLOCK or self.shard_rows % ROWS_PER_BLOCK:
            raise ValueError(f"--shard-rows must be a positive multiple of {ROWS_PER_BLOCK}, not {self.shard_rows}")
        if self.output_format not in (None, *OUTPUT_FORMATS):
            raise ValueError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}")


RAY_FIELDS = tuple(f for f in RaySettings.__dataclass_fields__)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """`--engine {local,ray}`, `--threads` (= --n-threads) and the RaySettings flags, for the classify command."""
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this process, one file; ray: a Ray Data pipeline over files, folders or globs "
                             "of CSV/JSONL/Parquet, -o names an output folder of shards (default: local)")
    add_dataclass_arguments(parser, RaySettings, RAY_FIELDS, "Ray engine (with --engine ray)",
                            lambda name: list(OUTPUT_FORMATS) if name == "output_format" else None)
    parser.add_argument("--threads", dest="n_threads", type=int, default=None, metavar="T",
                        help="the same as --n-threads: llama.cpp threads, and the CPUs each Ray actor asks for")


def local_input(args: argparse.Namespace) -> str:
    """The one INPUT of a local run; ValueError for several, or for a Ray-only flag without --engine ray."""
    given = [f"--{n.replace('_', '-')}" for n in RAY_FIELDS if getattr(args, n, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} need --engine ray")
    if len(args.input) > 1:
        raise ValueError("the local engine reads one INPUT; --engine ray reads several files, folders or globs")
    return args.input[0]


# ------------------------------------------------------------------------------------------------ model check

def expected_sha256(model: Path) -> tuple[str, str]:
    """(sha256, where it came from): the `make models` manifest beside the model when it lists the file
    (checked against the file here too), else the hash of the file on this machine."""
    from ..runtime import file_sha256      # here: the runtime's adapter module loads gguf and numpy
    manifest = model.parent / MODELS_MANIFEST
    if manifest.is_file():
        outputs = json.loads(manifest.read_text(encoding="utf-8")).get("outputs", {})
        listed = next((o["sha256"] for o in outputs.values() if o.get("file") == model.name), None)
        if listed:
            if file_sha256(model) != listed:
                raise ValueError(f"{model}: its sha256 differs from {manifest}; rebuild it with `make models`")
            return listed, str(manifest)
    return file_sha256(model), "hashed by the driver"


class ModelMismatch(RuntimeError):
    """An actor's copy of the model is missing or differs from the driver's."""


def _text(value) -> str | None:
    """A string column's value from a numpy batch: Ray hands nulls over as None or NaN."""
    return value if isinstance(value, str) else None


class _Classifier:
    """One Ray actor: checks the model's sha256, loads it once, then labels blocks of rows."""

    def __init__(self, model: str, sha256: str, settings: dict):
        host = socket.gethostname()
        if not Path(model).is_file():
            raise ModelMismatch(f"{model}: not found on node {host}; put the model at this path on every node")
        from ..runtime import AllInOne, file_sha256
        if file_sha256(Path(model)) != sha256:
            raise ModelMismatch(f"{model} on node {host} has another sha256 than {sha256[:12]}...; copy the "
                                "same file to every node")
        self.bot = AllInOne(model, **settings)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        from ..runtime import BRANCHES
        from .rowio import Record
        n = len(batch["shard"])
        label, conf, error = [None] * n, [float("nan")] * n, [_text(e) for e in batch["error"]]
        groups: dict[tuple[int, int], list[tuple[int, Record]]] = {}
        for i in range(n):
            if error[i] is None:   # grouped as the local command groups a file's rows, so answers match it
                key = (int(batch["shard"][i]), int(batch["seq"][i]) // BRANCHES)
                groups.setdefault(key, []).append((i, Record(0, {}, str(batch["text"][i]))))
        for members in groups.values():
            answers = classify_group(self.bot, [rec for _, rec in members])
            for i, rec in members:
                s = answers[id(rec)]
                if isinstance(s, Exception):
                    error[i] = f"{batch['at'][i]}: {s}"
                else:
                    label[i], conf[i] = s.label, round(s.confidence, 4)
        return {"shard": batch["shard"], "seq": batch["seq"], "fields": batch["fields"],
                "sentiment": np.array(label, dtype=object), "confidence": np.array(conf, dtype=float),
                "error": np.array(error, dtype=object)}


def _read_rows(item: dict, inputs: list[dict], column: str, gold: str | None):
    """flat_map: the records of one chunk as rows (the original fields as JSON, which any input fits)."""
    chunk = Chunk(**{k: int(v) for k, v in item.items()})
    f = InputFile(**inputs[chunk.input])
    unit = "row" if f.fmt == "parquet" else "line"
    for k, rec in enumerate(read_span(chunk, f, column, gold)):
        yield {"shard": chunk.shard, "seq": chunk.seq + k, "at": f"{unit} {rec.line}", "text": rec.text,
               "fields": json.dumps(rec.fields, ensure_ascii=True, default=str), "error": rec.error}


# ---------------------------------------------------------------------------------------------------- driver

def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return None
    return ray


def _connect(ray, address: str | None) -> None:
    extra = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS / the last one started'}: "
                         f"{exc}") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False        # our own bar counts rows; Ray's would interleave with it
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _pipeline(ray, chunks: list[Chunk], inputs: list[InputFile], args, model: str, sha256: str, settings: dict,
              opts: RaySettings, actors: int, threads: int):
    """chunks -> rows (one task and one block per chunk, on this node) -> the actors' labels."""
    from ..runtime import BRANCHES
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=max(1, len(chunks)))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for scheduling_strategy, max_restarts and max_task_retries, and warns
        # about the generic ones
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        # Reading runs on this node, so the inputs need only be here (as the output is). It asks for no CPU
        # (the actors hold them all, and parsing is light next to the model), so it is capped instead: Ray
        # starts a worker process for every task that may run.
        ds = ds.flat_map(_read_rows, fn_kwargs={"inputs": [asdict(f) for f in inputs], "column": args.column,
                                                "gold": args.gold},
                         num_cpus=0, compute=ray.data.TaskPoolStrategy(size=min(READERS, len(chunks))), scheduling_strategy=here)
        return ds.map_batches(_Classifier, fn_constructor_kwargs={"model": model, "sha256": sha256,
                                                                  "settings": settings},
                              batch_size=BRANCHES, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads,
                              max_restarts=opts.max_restarts, max_task_retries=opts.max_task_retries)


def _prepare_output(out: Path, args, plan: dict) -> Manifest | None:
    """The earlier run's manifest for --resume (checked against this plan); clears the folder for --overwrite."""
    earlier = Manifest.load(out) if out.is_dir() else None
    leftovers = out.is_dir() and (earlier is not None or any(out.glob(SHARD_PREFIX + "*")))
    if args.overwrite and out.is_dir():
        clear_output(out)
        return None
    if args.resume:
        if earlier is None:
            if leftovers:
                raise ValueError(f"{out} has shard files but no {MANIFEST}: --overwrite starts again")
            return None
        if earlier.plan != plan:
            changed = sorted(k for k in plan.keys() | earlier.plan.keys() if plan.get(k) != earlier.plan.get(k))
            raise ValueError(f"{out} was written for other {', '.join(changed)}; --overwrite starts again, or "
                             "pick another output folder")
        for tmp in out.glob(SHARD_PREFIX + "*.tmp"):   # a shard cut off by the interruption
            tmp.unlink()
        return earlier
    if leftovers:
        raise ValueError(f"{out} holds an earlier run; --resume continues it, --overwrite replaces it")
    return None


def run_classify_ray(args: argparse.Namespace, rules: RuleSet | None = None) -> int:
    """`classify --engine ray`, with the rules already read; ValueError for a user's mistake (the CLI prints it as
    one line)."""
    ray = _import_ray()
    if ray is None:
        raise ValueError(INSTALL_HINT)
    opts = RaySettings(**overrides(args, RAY_FIELDS))
    if "-" in args.input or args.output == "-":
        raise ValueError("--engine ray reads files, folders or globs and writes shards: name them, and -o FOLDER")
    if args.sort != "input":
        raise ValueError("--sort priority needs --engine local: Ray writes each shard as soon as it is complete")
    settings = overrides(args, CLASSIFY_SETTINGS)
    full = Settings().replace(**settings)
    model = Path(args.model).resolve()
    if not model.is_file():
        raise ValueError(f"{model}: no such model file (make models builds one)")
    inputs, shards, chunks = plan_shards(expand_inputs(args.input), args.format, args.column, args.gold,
                                         opts.shard_rows, ROWS_PER_BLOCK)
    if rules is not None:
        for f in inputs:
            try:
                refuse_clash(f.header, RULE_COLUMNS, ", which --rules adds")
            except ValueError as exc:
                raise ValueError(f"{f.path}: {exc}") from None
    out_fmt = opts.output_format or default_output_format(inputs)
    check_output_format(inputs, out_fmt)
    sha256, sha_from = expected_sha256(model)
    answers = {k: v for k, v in asdict(full).items() if k != "n_threads"}   # the settings that change labels
    # no "rules" key without --rules, so the plans of earlier runs still match
    with_rules = {"rules": {"file": rules.source, "sha256": rules.sha256}} if rules else {}
    plan = plan_record(inputs, shards, column=args.column, gold=args.gold, output_format=out_fmt,
                       model={"path": str(model), "sha256": sha256, "sha256_from": sha_from}, settings=answers,
                       **with_rules)
    out = Path(args.output)
    earlier = _prepare_output(out, args, plan)
    out.mkdir(parents=True, exist_ok=True)
    sink = _Sink(out, out_fmt, inputs, shards, args.column, rules)
    if earlier:
        sink.keep_earlier(earlier)

    _connect(ray, opts.address)
    threads = full.n_threads
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = opts.actors or max(1, cpus // threads)
    manifest = Manifest(plan, engine={"address": opts.address, "actors": actors, "threads": threads,
                                      "cluster_cpus": cpus, "max_restarts": opts.max_restarts,
                                      "max_task_retries": opts.max_task_retries, "ray": ray.__version__},
                        rows_in=sum(s.rows for s in shards))
    sink.fill(manifest)
    if actors * threads > cpus:
        print(f"note: {actors} actors x {threads} threads ask for more than the cluster's {cpus} CPUs; "
              "the rest wait for CPUs to free up", file=sys.stderr)
    try:
        todo = {s.index for s in sink.todo}
        if todo:
            sink.run(ray, _pipeline(ray, [c for c in chunks if c.shard in todo], inputs, args, str(model), sha256,
                                    settings, opts, actors, threads), quiet=args.quiet)
    except KeyboardInterrupt:
        sink.fill(manifest)
        print(f"interrupted; {manifest.rows_out} of {manifest.rows_in} rows are in {out}: rerun with --resume "
              "to continue", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        sink.fill(manifest)
        print(f"error: the Ray run stopped: {exc}\n{manifest.rows_out} of {manifest.rows_in} rows are in {out}: "
              "rerun with --resume to continue", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    manifest.engine["seconds_to_first_rows"] = round(sink.first, 2)
    manifest.seconds = round(sink.seconds, 2)
    texts = sink.written - sink.bad
    manifest.engine["texts_per_second_after_first_rows"] = round(sink.steady_rate(), 2)
    sink.fill(manifest)
    rate = f"{texts / sink.seconds:.1f} texts/s" if sink.seconds > 0 and texts else "no texts classified"
    print(f"classified {texts} texts in {sink.seconds:.1f} s ({rate}; first rows after {sink.first:.1f} s) "
          f"with {actors} actors x {threads} threads; {len(shards)} shards and {MANIFEST} in {out}"
          + (f"; {len(shards) - len(sink.todo)} shards kept from the earlier run" if earlier else ""))
    if manifest.rows_error:
        print(f"{manifest.rows_error} bad rows written with an error field (listed above, and in the shards)")
    if not manifest.complete:
        print(f"error: {manifest.rows_in - manifest.rows_out} rows are missing; rerun with --resume", file=sys.stderr)
        return 1
    if args.gold:
        print_gold(sink.read_all(), args.gold, print)
    return 0


class _Sink:
    """The driver's end of the pipeline: rows by shard, each shard written once all its rows are in."""

    def __init__(self, out: Path, out_fmt: str, inputs: list[InputFile], shards: list[Shard], column: str,
                 rules: RuleSet | None = None):
        self.out, self.fmt, self.inputs, self.shards, self.column = out, out_fmt, inputs, shards, column
        self.rules = rules
        self.errors: dict[int, int] = {}        # shard index -> bad rows, for the shards written
        self.todo = list(shards)
        self.pending: dict[int, dict[int, dict]] = {}
        self.written = self.bad = self.duplicates = 0   # rows this run wrote, those with an error, dropped
        self.first = self.seconds = 0.0                  # seconds to the first rows, and in all
        self.at_first = 0                                # rows in the first batch

    def path(self, shard: Shard) -> Path:
        return self.out / shard_file(shard, self.fmt)

    def keep_earlier(self, earlier: Manifest) -> None:
        """Skip the shards an earlier run wrote; their bad-row counts come from its manifest, or the file."""
        counted = {e["file"]: e.get("errors") for e in earlier.shards}
        for s in self.shards:
            if self.path(s).is_file():
                n = counted.get(self.path(s).name)
                self.errors[s.index] = n if n is not None else sum(
                    1 for r in read_shard(self.path(s), self.fmt) if r.get("error"))
        self.todo = [s for s in self.shards if s.index not in self.errors]

    def fill(self, manifest: Manifest) -> None:
        """The manifest as the shard files on disk are now; saved."""
        present = [s for s in self.shards if s.index in self.errors]
        manifest.shards = [{"file": self.path(s).name, "rows": s.rows, "errors": self.errors[s.index]}
                           for s in present]
        manifest.rows_out = sum(s.rows for s in present)
        manifest.rows_error = sum(self.errors.values())
        manifest.duplicates_dropped = self.duplicates
        manifest.complete = len(present) == len(self.shards)
        manifest.save(self.out)

    def run(self, ray, ds, quiet: bool) -> None:
        from tqdm import tqdm
        by_index = {s.index: s for s in self.todo}
        total = sum(s.rows for s in self.shards)
        bar = tqdm(total=total, initial=total - sum(s.rows for s in self.todo), unit="text", file=sys.stderr,
                   disable=quiet, desc="classify (ray)", dynamic_ncols=True, mininterval=0.5)
        start = time.perf_counter()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if not self.first:
                    self.first, self.at_first = time.perf_counter() - start, len(batch["shard"])
                for i in range(len(batch["shard"])):
                    self._take(batch, i, by_index, bar)
        except ray.exceptions.RayError as exc:
            raise RuntimeError(_ray_error(exc)) from None
        finally:
            self.seconds = time.perf_counter() - start
            bar.close()

    def _take(self, batch: dict, i: int, by_index: dict[int, Shard], bar) -> None:
        index, seq = int(batch["shard"][i]), int(batch["seq"][i])
        rows = self.pending.setdefault(index, {})
        if index not in by_index or seq in rows:   # a row delivered twice (a retried block): keep the first
            self.duplicates += 1
            return
        shard = by_index[index]
        row = json.loads(batch["fields"][i])
        conf = float(batch["confidence"][i])
        row.update(sentiment=_text(batch["sentiment"][i]), confidence=None if conf != conf else conf,
                   error=_text(batch["error"][i]))
        if self.rules is not None:
            text = row.get(self.column)
            row.update(row_columns(self.rules.match(text if isinstance(text, str) else "")))
        if row["error"]:
            bar.write(f"{self.inputs[shard.input].path}: {row['error']}", file=sys.stderr)
        rows[seq] = row
        bar.update()
        if len(rows) == shard.rows:
            ordered = [rows[k] for k in range(shard.rows)]
            columns = output_columns(self.inputs[shard.input], self.column) + list(RULE_COLUMNS if self.rules else ())
            write_shard(self.path(shard), self.fmt, columns, ordered)
            self.errors[index] = sum(1 for r in ordered if r["error"])
            self.written, self.bad = self.written + shard.rows, self.bad + self.errors[index]
            del self.pending[index], by_index[index]

    def steady_rate(self) -> float:
        """Rows per second once the first rows were in: the speed with Ray and the models started."""
        busy = self.seconds - self.first
        return (self.written - self.at_first) / busy if busy > 0 else 0.0

    def read_all(self) -> list[dict]:
        return [row for s in self.shards if s.index in self.errors for row in read_shard(self.path(s), self.fmt)]


def _ray_error(exc: Exception) -> str:
    """The line of a Ray error that says what went wrong (Ray wraps it in tracebacks)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    ours = [line for line in lines if "ModelMismatch" in line or "ModelLoadError" in line]
    return (ours or lines or [type(exc).__name__])[-1]
