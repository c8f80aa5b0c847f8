"""Command line: classify whole files for triage and moderation, and chat in the terminal.

    python -m allinone_gguf classify reviews.csv -o scored.csv --gold label     # accuracy at the end
    python -m allinone_gguf classify messages.txt -o triage.csv --sort priority # negatives first
    python -m allinone_gguf classify messages.txt -o triage.csv --sort priority --rules docs/rules.example.txt
    cat messages.jsonl | python -m allinone_gguf classify - --field body > scored.jsonl
    python -m allinone_gguf chat --model models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf

Flag defaults come from `Settings` (allinone_gguf/runtime/config.py, through faces/flags.py) and the app's
default model path (faces/defaults.py). llama.cpp is loaded only when a command runs, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import collections
import functools
import itertools
import os
import signal
import sys
import threading
import time
import typing
from pathlib import Path

from ..runtime.config import Settings
from .defaults import DEFAULT_MODEL, AppSettings
from .classify_common import CLASSIFY_SETTINGS, UserError, classify_group, print_gold
from ..scoring import NEGATIVE, normalise_gold
from .flags import add_dataclass_arguments, add_settings_arguments, overrides
from .ray_classify import add_engine_arguments, local_input, run_classify_ray
from .rowio import (RowWriter, count_done, detect_format, open_text, output_header, read_records, read_rows,
                    refuse_clash)
from .rules import RULE_COLUMNS, SEVERITIES, load_rules, row_columns, triage_key
from .ui_helpers import badge

# Settings fields each command exposes as flags (the sentiment role needs no sampling knobs).
CHAT_SETTINGS = ("n_threads", "n_ctx", "labels", "temperature", "top_p", "top_k", "repeat_penalty",
                 "max_tokens", "seed", "sentiment_adapter", "sentiment_prompt")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", type=Path, default=DEFAULT_MODEL,
                        help=f"GGUF model file (default: {DEFAULT_MODEL}, made by `make models`)")


def load_bot(path: Path, overrides: dict):
    """(AllInOne, seconds to load); the model's own error message when it cannot be loaded."""
    from ..runtime import AllInOne  # late: `--help` should not wait for llama.cpp
    start = time.perf_counter()
    bot = AllInOne(path, **overrides)
    return bot, time.perf_counter() - start


def adapter_note(bot) -> str:
    """One line saying which path gives the labels: the sentiment adapter (tune) or the grammar alone."""
    a = bot.sentiment_adapter
    if a is None:
        return "sentiment: the model's own weights, grammar-forced (no sentiment adapter)"
    return (f"sentiment: adapter {a.path.name} for {a.labels} labels (temperature {a.temperature}); "
            "--sentiment-adapter off for the model alone")


# ---------------------------------------------------------------------------------------------- classify

def add_classify_parser(sub) -> None:
    p = sub.add_parser(
        "classify", help="label every text of a CSV / JSONL / text file with 正面/负面 and a confidence",
        description="Label every text of a file and write every input row plus `sentiment`, `confidence` and "
                    "`error` columns, one row at a time (an interrupted run loses nothing; --resume continues "
                    "it). Bad rows (empty text, broken UTF-8, wrong number of CSV fields) are reported with "
                    "their line numbers and written with `error` set; the run goes on.")
    p.add_argument("input", nargs="+", help="CSV/TSV (header line first), JSONL, or plain text one message per "
                                            "line; `-` reads stdin (--engine ray: files, folders, globs, Parquet)")
    p.add_argument("-o", "--output", default="-",
                   help="output file; .jsonl/.json gives JSONL, anything else CSV (default: stdout, in the "
                        "input's format)")
    p.add_argument("--format", choices=["auto", "csv", "tsv", "jsonl", "txt"], default="auto",
                   help="input format (default: from the extension, or sniffed from the first line of stdin)")
    p.add_argument("--column", "--field", dest="column", default="text",
                   help="CSV column / JSONL field holding the text (default: text)")
    p.add_argument("--gold", metavar="COLUMN",
                   help="column / field with the true label (1/0, 正面/负面, positive/negative): print "
                        "accuracy, per-class recall and a confusion table at the end")
    p.add_argument("--sort", choices=["input", "priority"], default="input",
                   help="output order: input (default), or priority = negatives first, most confident first "
                        "(then the least confident positives; rows with errors last); with --rules the most "
                        "severe matched rule comes first, then that order. Rows are still written one by one to "
                        "OUTPUT.part and sorted into OUTPUT at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep OUTPUT's rows and classify only the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_dataclass_arguments(p, AppSettings, ["rules"])
    add_model_argument(p)
    add_settings_arguments(p, CLASSIFY_SETTINGS)
    add_engine_arguments(p)
    p.set_defaults(func=run_classify)


def _peek(stream) -> tuple[str, typing.Iterator[str]]:
    first = stream.readline()
    return first, itertools.chain([first] if first else [], stream)


def _open_input(args) -> tuple[str, list[str] | None, typing.Iterator]:
    """(format, CSV header, records) of args.input."""
    try:
        stream = open_text(args.input)
    except OSError as exc:
        raise UserError(f"{args.input}: cannot read ({exc.strerror})") from None
    first, lines = _peek(stream)
    fmt = detect_format(args.input, first, args.column) if args.format == "auto" else args.format
    try:
        header, records = read_records(lines, fmt, args.column, args.gold)
    except ValueError as exc:
        raise UserError(f"{args.input}: {exc}") from None
    return fmt, header, records


def count_lines(path: str) -> int | None:
    """Lines of a file, counted in its bytes without parsing: the progress bar's total. Every record starts on
    a line of its own, so this bounds the records from above (a quoted CSV field may span lines, blank lines
    are skipped); None for stdin."""
    if path == "-":
        return None
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def p_negative(row: dict) -> float | None:
    """P(negative) of an output row (its values may be CSV strings); None for a row without a label."""
    try:
        confidence = float(row["confidence"])
        negative = normalise_gold(row["sentiment"]) == NEGATIVE
    except (KeyError, TypeError, ValueError):
        return None
    return confidence if negative else 1.0 - confidence


def priority_key(row: dict, with_rules: bool = False) -> tuple:
    """Sort key for --sort priority: with rules the most severe matched rule first, then P(negative)
    descending; rows without a label last (rules.triage_key). Without rules an input column that happens to be
    called `severity` is not read."""
    return triage_key(row.get("severity") if with_rules else None, p_negative(row))


def _write_all(path: str, fmt: str, header, rows: list[dict]) -> None:
    """Write rows to path atomically (a temporary file renamed over it), or to stdout."""
    tmp = path if path == "-" else path + ".tmp"
    if tmp != "-" and os.path.exists(tmp):
        os.remove(tmp)
    writer = RowWriter(tmp, fmt, header)
    for row in rows:
        writer.write(row)
    writer.close()
    if tmp != path:
        os.replace(tmp, path)


def run_classify(args) -> int:
    try:
        rules = load_rules(args.rules) if args.rules else None   # a bad file stops here, before the model loads
        if args.engine == "ray":
            return run_classify_ray(args, rules)
        args.input = local_input(args)
    except ValueError as exc:  # rules.RulesError among them
        raise UserError(str(exc)) from None
    key = functools.partial(priority_key, with_rules=rules is not None)
    out = args.output
    out_fmt_ext = detect_format(out) if out != "-" else None
    if args.resume and out == "-":
        raise UserError("--resume needs an output file (-o OUTPUT)")
    work = out + ".part" if (args.sort == "priority" and out != "-") else out
    if out != "-" and not args.resume and not args.overwrite and (Path(out).exists() or Path(work).exists()):
        raise UserError(f"{out} exists; --resume continues it, --overwrite replaces it")
    if args.input != "-" and out != "-" and Path(args.input).resolve() == Path(out).resolve():
        raise UserError("the output file must not be the input file")
    in_fmt, header, records = _open_input(args)
    out_fmt = "jsonl" if (out_fmt_ext == "jsonl" or (out == "-" and in_fmt == "jsonl")) else "csv"
    if in_fmt == "jsonl" and out_fmt == "csv":
        raise UserError("JSONL input is written as JSONL: name the output *.jsonl")
    try:
        if rules is not None:
            refuse_clash(header, RULE_COLUMNS, ", which --rules adds")
    except ValueError as exc:
        raise UserError(f"{args.input}: {exc}") from None
    columns = output_header(header, args.column) if out_fmt == "csv" else None
    if columns is not None and rules is not None:
        columns += RULE_COLUMNS
    say = (lambda *a: print(*a, file=sys.stderr)) if out == "-" else print

    if args.overwrite:
        for path in {out, work}:
            if path != "-" and os.path.exists(path):
                os.remove(path)
    done = 0
    if args.resume:
        if work != out and not Path(work).exists() and Path(out).exists():
            os.replace(out, work)  # an earlier unsorted or finished run: continue from it
        try:
            done = count_done(work, out_fmt, columns)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    lines = count_lines(args.input)
    total = None if lines is None else max(lines - (header is not None), done)  # the header line is no record

    from ..runtime import BRANCHES, ModelLoadError
    try:
        bot, load_s = load_bot(args.model, overrides(args, CLASSIFY_SETTINGS))
    except (ModelLoadError, ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    say(adapter_note(bot))

    from tqdm import tqdm
    kept = [] if out == "-" and args.sort == "priority" else None  # stdout + sort: rows wait in memory
    writer = RowWriter(work, out_fmt, columns) if kept is None else None
    seen = [] if out == "-" and args.gold else None                # stdout + gold: scored from memory
    bar = tqdm(total=total, initial=done, unit="text", file=sys.stderr, disable=args.quiet,
               desc="classify", dynamic_ncols=True, mininterval=0.5)
    classified, bad, start = 0, [], time.perf_counter()
    flagged = collections.Counter()      # rows this run by their highest matched severity (with --rules)
    rest = itertools.islice(records, done, None)
    try:
        # Rows go to the model a group at a time (classify_many decodes a group in one batch) and are written
        # one by one as soon as their group is done; an interruption loses at most the group in flight.
        # A group is as many rows as the runtime classifies in one batch.
        while group := list(itertools.islice(rest, BRANCHES)):
            answers = classify_group(bot, [rec for rec in group if rec.error is None])
            for rec in group:
                row = dict(rec.fields)
                if rec.error is None:
                    s = answers[id(rec)]
                    if isinstance(s, Exception):
                        rec.error = f"line {rec.line}: {s}"
                    else:
                        row.update(sentiment=s.label, confidence=round(s.confidence, 4), error=None)
                        classified += 1
                if rec.error is not None:
                    row.update(sentiment=None, confidence=None, error=rec.error)
                    bad.append(rec.line)
                    bar.write(f"{args.input}: {rec.error}", file=sys.stderr)
                if rules is not None:           # beside the label, on every row with text, whatever its label
                    row.update(row_columns(rules.match(rec.text)))
                    flagged[row["severity"]] += 1
                (kept.append(row) if kept is not None else writer.write(row))
                if seen is not None:
                    seen.append(row)
                bar.update()
    except KeyboardInterrupt:
        bar.close()
        if writer:
            writer.close()
        where = f"; they are in {work}, rerun with --resume to continue" if out != "-" else ""
        print(f"interrupted after {bar.n} rows{where}", file=sys.stderr)
        return 130
    finally:
        bot.close()
    bar.total = bar.n  # the line count was an upper bound: the finished bar shows the rows there were
    bar.close()
    seconds = time.perf_counter() - start
    if writer:
        writer.close()
    else:
        _write_all("-", out_fmt, columns, sorted(kept, key=key))
    rows = seen if seen is not None else (read_rows(work, out_fmt) if (args.gold or work != out) else [])
    if work != out:
        _write_all(out, out_fmt, columns, sorted(rows, key=key))
        os.remove(work)
    rate = f"{classified / seconds:.1f} texts/s" if seconds > 0 and classified else "no texts classified"
    say(f"classified {classified} texts in {seconds:.1f} s ({rate}; model loaded in {load_s:.1f} s)"
        + (f"; {done} rows kept from the earlier run" if done else ""))
    if bad:
        lines = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
        say(f"{len(bad)} bad row{'s' * (len(bad) > 1)} written with an error field (input lines {lines})")
    if rules is not None:
        counts = ", ".join(f"{flagged[s]} {s}" for s in reversed(SEVERITIES) if flagged[s])
        say(f"rules ({len(rules)} from {rules.source}): {sum(flagged.values()) - flagged[None]} of "
            f"{sum(flagged.values())} rows matched" + (f" ({counts})" if counts else ""))
    if args.gold:
        print_gold(rows, args.gold, say)
    return 0


# -------------------------------------------------------------------------------------------------- chat

CHAT_HELP = "Ctrl-C stops a reply, /reset forgets the conversation, /exit or Ctrl-D leaves."


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="terminal chat: a sentiment badge, then the streamed reply",
                       description="Chat in the terminal as in the app: each message gets the sentiment badge, "
                                   "then the streamed reply; the conversation is remembered. " + CHAT_HELP)
    add_model_argument(p)
    add_settings_arguments(p, CHAT_SETTINGS)
    p.set_defaults(func=run_chat)


class _CtrlC:
    """While active, Ctrl-C sets `pressed` instead of raising KeyboardInterrupt, so a reply stops between two
    pieces and never in the middle of a llama.cpp call (which would leave the runtime's bookkeeping behind)."""

    def __init__(self):
        self.pressed, self._previous = False, None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame) -> None:
        self.pressed = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def chat_turn(bot, text: str, history: list[dict], lang: str, out) -> str:
    """Badge, then the reply streamed to `out`; Ctrl-C ends the reply early. Returns the reply as shown."""
    pieces: list[str] = []
    stream = None
    with _CtrlC() as ctrl_c:
        try:
            stream = bot.respond(text, history=history)     # the label, then the reply that knows it
            s = stream.sentiment()
            out.write(badge(s.label, s.confidence, s.is_negative, lang, s.source) + "\n")
            out.flush()
            if not ctrl_c.pressed:
                for piece in stream:
                    pieces.append(piece)
                    out.write(piece)
                    out.flush()
                    if ctrl_c.pressed:
                        break
        except KeyboardInterrupt:  # raised by something other than our handler (e.g. a test's fake model)
            ctrl_c.pressed = True
        finally:
            if stream is not None:
                stream.close()  # an abandoned generator releases the model lock
        if ctrl_c.pressed:
            out.write(" [stopped]")
        out.write("\n\n")
        out.flush()
    return "".join(pieces)


def chat_loop(bot, lang: str, read=input, out=sys.stdout) -> None:
    """Read a message, answer it, keep the history; until /exit or end of input."""
    history: list[dict] = []
    while True:
        try:
            text = read("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write(f"\n({CHAT_HELP})\n")
            continue
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history.clear()
            out.write("(conversation forgotten)\n")
            continue
        if not command:
            continue
        reply = chat_turn(bot, text, history, lang, out)
        history.append({"role": "user", "content": text})
        if reply.strip():  # a reply stopped before its first piece leaves no assistant turn
            history.append({"role": "assistant", "content": reply})


def run_chat(args) -> int:
    from ..runtime import ModelLoadError
    given = overrides(args, CHAT_SETTINGS)
    try:
        bot, load_s = load_bot(args.model, given)
    except (ModelLoadError, ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print(f"{args.model.name} loaded in {load_s:.1f} s; {adapter_note(bot)}. {CHAT_HELP}", file=sys.stderr)
    with bot:
        chat_loop(bot, given.get("labels", Settings().labels))
    return 0
