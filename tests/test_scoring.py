"""The one `label,text` reader, the one scoring function and the one margin -> probability, as each caller uses
them: the bench keeps blank texts, the accuracy script skips them, training refuses them; tune counts with
scoring.score. Pure: no model."""
import math

import pytest

from allinone_gguf.runtime import sigmoid
from allinone_gguf.runtime.sentiment import sentiment_from_margin
from allinone_gguf.scoring import NEGATIVE, POSITIVE, read_labeled_csv, score
from allinone_gguf.tune.data import read_labelled
from allinone_gguf.tune.run import score as tune_score

ROWS = "label,text\n1,好\nnegative,差\n正面, \n0, 一般 \n"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufeff" + ROWS, encoding="utf-8")       # with a BOM, as spreadsheet exports write it
    return path


@pytest.mark.parametrize("empty, expected", [
    ("keep", [(POSITIVE, "好"), (NEGATIVE, "差"), (POSITIVE, " "), (NEGATIVE, " 一般 ")]),
    ("skip", [(POSITIVE, "好"), (NEGATIVE, "差"), (NEGATIVE, " 一般 ")]),
])
def test_blank_texts_are_kept_or_skipped_and_the_limit_counts_what_is_kept(data, empty, expected):
    assert read_labeled_csv(data, empty=empty) == expected
    assert read_labeled_csv(data, limit=3, empty=empty) == expected[:3]


def test_training_refuses_a_blank_text_with_its_line_and_reads_every_gold_form(data, tmp_path):
    with pytest.raises(ValueError, match=r"d\.csv, line 4: empty text"):
        read_labelled(data)
    ok = tmp_path / "ok.csv"
    ok.write_text("\ufefflabel,text\n正面,好 \npositive,棒\n0,差\n", encoding="utf-8")
    assert read_labelled(ok) == [(1, "好"), (1, "棒"), (0, "差")]
    with pytest.raises(ValueError, match="empty must be one of"):
        read_labeled_csv(ok, empty="drop")


class FakeBot:
    """classify_many's answers from a table: text -> margin."""

    def __init__(self, margins: dict[str, float]):
        self.margins = margins

    def classify_many(self, texts, labels=None):
        words = {"zh": ("正面", "负面"), "en": ("Positive", "Negative")}[labels or "zh"]
        return [sentiment_from_margin(self.margins[t], words) for t in texts]


def test_tune_counts_with_scoring_score_and_keys_recall_by_its_label_words():
    rows = [(1, "a"), (1, "b"), (0, "c"), (0, "d")]
    bot = FakeBot({"a": 2.0, "b": -1.0, "c": -3.0, "d": -0.5})
    found = tune_score(bot, rows, "en")
    reference = score([POSITIVE, POSITIVE, NEGATIVE, NEGATIVE], [POSITIVE, NEGATIVE, NEGATIVE, NEGATIVE])
    assert found["accuracy"] == reference.accuracy == 0.75
    assert found["recall"] == {"Positive": 0.5, "Negative": 1.0}
    assert found["margins"] == [2.0, -1.0, -3.0, -0.5] and found["n"] == 4
    assert tune_score(bot, [(0, "c")], "zh")["recall"] == {"正面": None, "负面": 1.0}   # a class absent: None


def test_sigmoid_is_clamped_so_any_margin_gives_a_probability():
    assert sigmoid(0.0) == 0.5 and sigmoid(1e6) == 1.0 and sigmoid(-1e6) < 1e-25
    assert math.isclose(sigmoid(2.0) + sigmoid(-2.0), 1.0)
    assert sentiment_from_margin(-1e9, ("正面", "负面")).confidence == 1.0
