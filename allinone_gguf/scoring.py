"""Accuracy, per-class recall and a confusion table for binary sentiment labels, and the one `label,text` reader.

    >>> s = score(["正面", "负面"], ["正面", "正面"])
    >>> s.accuracy, s.recall["负面"]
    (0.5, 0.0)

Gold labels arrive in the forms the data sets use (1/0, 正面/负面, positive/negative); `normalise_gold`
maps them onto the canonical Chinese labels so every caller counts the same way; `read_labeled_csv` is the
one reader of those `label,text` files (the bench, the accuracy script and the tune step use it). Standard
library only, and beside the layers rather than in one: the faces, the measurement and the tune step all count
with it.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

POSITIVE, NEGATIVE = "正面", "负面"

_GOLD_FORMS = {
    "1": POSITIVE, "正面": POSITIVE, "positive": POSITIVE, "pos": POSITIVE,
    "0": NEGATIVE, "负面": NEGATIVE, "negative": NEGATIVE, "neg": NEGATIVE,
}


def normalise_gold(value: object) -> str:
    """Map a gold label (1/0, 正面/负面, positive/negative, any case) onto 正面/负面."""
    key = str(value).strip().lower()
    if key not in _GOLD_FORMS:
        raise ValueError(f"gold label {value!r} is not one of 1/0, 正面/负面, positive/negative")
    return _GOLD_FORMS[key]


EMPTY_TEXT = ("keep", "skip", "error")   # what read_labeled_csv does with a row whose text is blank


def read_labeled_csv(path: str | Path, limit: int = 0, empty: str = "keep") -> list[tuple[str, str]]:
    """(gold label as 正面/负面, text) for each row of a CSV whose header has `label` and `text` (the data sets'
    form; a UTF-8 BOM is fine); limit > 0 keeps the first rows. A row whose text is blank is kept (`empty`
    "keep": the bench counts it), left out ("skip": the accuracy script) or an error ("error": training).
    A missing column, an unreadable label or (with "error") a blank text is a ValueError naming the file and
    the line."""
    if empty not in EMPTY_TEXT:
        raise ValueError(f"empty must be one of {', '.join(EMPTY_TEXT)}, not {empty!r}")
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = sorted({"label", "text"} - set(reader.fieldnames or ()))
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)} in the header; expected label,text")
        for row in reader:
            try:
                gold = normalise_gold(row["label"])
            except ValueError as exc:
                raise ValueError(f"{path}, line {reader.line_num}: {exc}") from None
            text = row["text"] or ""
            if not text.strip() and empty != "keep":
                if empty == "error":
                    raise ValueError(f"{path}, line {reader.line_num}: empty text")
                continue
            rows.append((gold, text))
            if limit and len(rows) >= limit:
                break
    return rows


@dataclass(frozen=True)
class Score:
    n: int
    accuracy: float
    recall: dict[str, float]                  # per gold class: correct / gold count (nan when a class is absent)
    confusion: dict[str, dict[str, int]]      # confusion[gold][predicted] -> count
    invalid: int = 0                          # predictions that were neither label
    labels: tuple[str, ...] = field(default=(POSITIVE, NEGATIVE))

    def table(self) -> str:
        """A small plain-text confusion table, rows = gold, columns = predicted."""
        cols = list(self.labels) + (["other"] if self.invalid else [])
        lines = ["gold \\ pred  " + "  ".join(f"{c:>6}" for c in cols)]
        for g in self.labels:
            lines.append(f"{g:<12}" + "  ".join(f"{self.confusion[g].get(c, 0):>6}" for c in cols))
        return "\n".join(lines)


def score(gold: list[str], predicted: list[str], labels: tuple[str, ...] = (POSITIVE, NEGATIVE)) -> Score:
    """Score predictions against gold labels, both already in the canonical label set."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    confusion = {g: {} for g in labels}
    invalid = 0
    for g, p in zip(gold, predicted):
        key = p if p in labels else "other"
        invalid += key == "other"
        confusion[g][key] = confusion[g].get(key, 0) + 1
    correct = sum(confusion[g].get(g, 0) for g in labels)
    recall = {}
    for g in labels:
        total = sum(confusion[g].values())
        recall[g] = confusion[g].get(g, 0) / total if total else float("nan")
    n = len(gold)
    return Score(n=n, accuracy=correct / n if n else float("nan"), recall=recall,
                 confusion=confusion, invalid=invalid, labels=labels)


def reliability(gold_positive: list[bool], p_positive: list[float], bins: int = 10
                ) -> list[tuple[float, float, int]]:
    """(mean confidence, share right, answers) of each non-empty confidence bin: the confidence of an answer is
    the larger of P(pos), P(neg), binned in `bins` equal steps from 0.5 to 1 (a reliability diagram's points).

        >>> reliability([True, False], [0.9, 0.2])
        [(0.8, 1.0, 1), (0.9, 1.0, 1)]
    """
    buckets: dict[int, list[tuple[float, bool]]] = {}
    for g, p in zip(gold_positive, p_positive):
        conf = max(p, 1 - p)
        buckets.setdefault(min(bins - 1, int((conf - 0.5) * 2 * bins)), []).append((conf, (p > 0.5) == g))
    return [(round(sum(c for c, _ in b) / len(b), 6), sum(r for _, r in b) / len(b), len(b))
            for _, b in sorted(buckets.items())]


def expected_calibration_error(gold_positive: list[bool], p_positive: list[float], bins: int = 10) -> float:
    """ECE: the confidence of each answer against how often such answers are right, per reliability() bin,
    weighted by the bin's share of answers.

        >>> expected_calibration_error([True, False], [0.9, 0.2])
        0.15
    """
    if not gold_positive:
        return float("nan")
    total = len(gold_positive)
    return round(sum(abs(conf - right) * n / total
                     for conf, right, n in reliability(gold_positive, p_positive, bins)), 6)


def ece_floor(p_positive: list[float], bins: int = 10, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """(median, 90th percentile) of the ECE a *perfectly calibrated* classifier shows with these confidences on
    this many texts: labels drawn from the confidences themselves, `draws` times (fixed seed). On 200 texts it is
    about 0.05: an observed ECE near the median is what calibration can reach there; only the excess says
    something (a smaller floor needs more texts).

        >>> ece_floor([0.9] * 10_000)[0] < 0.01 < ece_floor([0.9] * 100)[0]
        True
    """
    import random
    rng = random.Random(seed)
    sims = sorted(expected_calibration_error([rng.random() < p for p in p_positive], p_positive, bins)
                  for _ in range(draws))
    return round(sims[draws // 2], 4), round(sims[int(draws * 0.9)], 4)
