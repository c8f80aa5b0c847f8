"""The sentiment role: its prompt frame around a text, the labels the grammar allows, and the answer.

    >>> from allinone_gguf.runtime.sentiment import head_tail, sentiment_from_margin
    >>> head_tail(list(range(10)), 5, marker=[-1])
    [0, 1, -1, 8, 9]
    >>> sentiment_from_margin(2.0, ("正面", "负面")).label
    '正面'

The label is read from one forward pass: the probabilities of the tokens the GBNF grammar allows first, summed
per label and renormalised over the labels. `margin` = log P(positive) - log P(negative) under the grammar.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .prompts import LABEL_SETS, SENTIMENT_GRAMMAR, SENTIMENT_PROMPTS


@dataclass(frozen=True)
class Sentiment:
    """The sentiment role's answer. `probs` holds both labels (positive first) and sums to 1; `margin` is
    log P(positive) - log P(negative) under the grammar (divided by the adapter's temperature), after
    `sentiment_bias`. `source` says which path produced it: "grammar" (the model's own weights and prompt) or
    "adapter" (the sentiment LoRA, adapter.py); the label is grammar-forced either way."""

    label: str
    confidence: float
    probs: dict[str, float]
    labels: tuple[str, str]
    margin: float = 0.0
    source: str = "grammar"

    @property
    def is_negative(self) -> bool:
        return self.label == self.labels[1]

    @property
    def is_positive(self) -> bool:
        return self.label == self.labels[0]


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x): P(positive) from a margin. x is clamped to ±60 (e^60 still fits a float; the result is 0 or
    1 to double precision beyond), so any margin, however large, gives a number rather than an OverflowError."""
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


def sentiment_from_margin(margin: float, labels: tuple[str, str], source: str = "grammar") -> Sentiment:
    p_pos = sigmoid(margin)
    label = labels[0] if margin > 0 else labels[1]
    probs = {labels[0]: p_pos, labels[1]: 1.0 - p_pos}
    return Sentiment(label=label, confidence=probs[label], probs=probs, labels=labels, margin=margin, source=source)


def head_tail(tokens: Sequence[int], budget: int, marker: Sequence[int] = ()) -> list[int]:
    """`tokens` if they fit in `budget`, else their head and tail around `marker` in exactly `budget` tokens."""
    if len(tokens) <= budget:
        return list(tokens)
    room = budget - len(marker)
    if room < 2:
        return list(tokens[:budget])
    head = room // 2            # the tail gets the odd token: reviews tend to conclude at the end
    return list(tokens[:head]) + list(marker) + list(tokens[len(tokens) - (room - head):])


def language_of(labels: str | None, default: str) -> str:
    lang = default if labels is None else labels
    if lang not in LABEL_SETS:
        raise ValueError(f"labels must be one of {tuple(LABEL_SETS)}, not {labels!r}")
    return lang


def sentiment_frame(variant: str, lang: str, tokenize: Callable[[str], list[int]],
                    render: Callable[[list[tuple[str, list[int]]], bool], list[int]]) -> tuple[list[int], list[int]]:
    """Tokens of the sentiment prompt before and after the text to judge, for one prompt variant and language."""
    p = SENTIMENT_PROMPTS[variant]
    turns = [("system", tokenize(p.system[lang]))]
    for text, k in p.shots:
        turns += [("user", tokenize(p.user.format(text=text))), ("assistant", tokenize(LABEL_SETS[lang][k]))]
    pre, post = p.user.split("{text}")
    turns.append(("user", [-1]))     # -1 marks where the text goes
    tokens = render(turns, True)
    cut = tokens.index(-1)
    return tokens[:cut] + tokenize(pre), tokenize(post) + tokens[cut + 1:]


class LabelReader:
    """Which first tokens the grammar allows, and which label each one begins."""

    def __init__(self, first_tokens: list[int], piece: Callable[[int], bytes], lang: str):
        self.labels = LABEL_SETS[lang]
        self.ids: tuple[list[int], list[int]] = ([], [])
        for tok in first_tokens:
            p = piece(tok)
            owners = [k for k, label in enumerate(self.labels) if label.encode("utf-8").startswith(p)]
            if len(owners) != 1:
                raise RuntimeError(f"grammar token {p!r} does not begin exactly one of {self.labels}")
            self.ids[owners[0]].append(tok)
        if not all(self.ids):
            raise RuntimeError(f"the grammar {SENTIMENT_GRAMMAR[lang]!r} allows no first token for one of "
                               f"{self.labels}")

    def margin(self, logits) -> float:
        """log P(positive) - log P(negative) under the grammar, from one row of logits."""
        def logsumexp(ids):
            xs = [float(logits[i]) for i in ids]
            m = max(xs)
            return m + math.log(sum(math.exp(x - m) for x in xs))
        return logsumexp(self.ids[0]) - logsumexp(self.ids[1])
