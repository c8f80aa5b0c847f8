"""What the classify command shares between its local engine (cli.py) and its Ray engine (ray_classify.py): the
settings it exposes, a group of rows classified with per-row errors, the --gold summary, and the one-line
user error both print.

    >>> from allinone_gguf.faces.classify_common import CLASSIFY_SETTINGS
    >>> "sentiment_tokens" in CLASSIFY_SETTINGS
    True
"""
from __future__ import annotations

from ..scoring import normalise_gold, score

# Settings fields the classify command exposes as flags (the sentiment role needs no sampling knobs).
CLASSIFY_SETTINGS = ("n_threads", "n_ctx", "labels", "sentiment_adapter", "sentiment_prompt", "sentiment_tokens",
                     "sentiment_bias", "sentiment_cache")


class UserError(Exception):
    """A mistake in the command line or the input; printed as one line, exit status 2."""


def classify_group(bot, recs) -> dict:
    """{id(record): Sentiment or the exception} for records with text; one batched call, or one call each when
    the batch fails, so a bad row gets its own error and the others their answers."""
    try:
        return {id(r): s for r, s in zip(recs, bot.classify_many([r.text for r in recs]))}
    except (ValueError, RuntimeError):
        out = {}
        for r in recs:
            try:
                out[id(r)] = bot.classify(r.text)
            except (ValueError, RuntimeError) as exc:
                out[id(r)] = exc
        return out


def gold_summary(rows: list[dict], gold: str) -> tuple[object, int, int]:
    """(Score over the rows with a label and a readable gold value, rows with errors, unreadable gold values)."""
    golds, preds, errors, unreadable = [], [], 0, 0
    for row in rows:
        if row.get("error") or not row.get("sentiment"):
            errors += 1
            continue
        try:
            g = normalise_gold(row.get(gold))
        except ValueError:
            unreadable += 1
            continue
        try:
            p = normalise_gold(row["sentiment"])
        except ValueError:
            p = str(row["sentiment"])  # counted as invalid by score()
        golds.append(g)
        preds.append(p)
    return score(golds, preds), errors, unreadable


def print_gold(rows: list[dict], gold: str, say) -> None:
    s, errors, unreadable = gold_summary(rows, gold)
    if not s.n:
        say(f"--gold {gold}: no row had both a readable gold label and a prediction")
        return
    skipped = "".join([f", {errors} rows with errors not scored" if errors else "",
                       f", {unreadable} unreadable gold values skipped" if unreadable else ""])
    say(f"accuracy {s.accuracy:.1%} on {s.n} rows{skipped}")
    say("recall   " + "  ".join(f"{label} {r:.1%}" if r == r else f"{label} – (no gold rows)"
                                for label, r in s.recall.items())
        + f"  invalid outputs {s.invalid}")
    say(s.table())
