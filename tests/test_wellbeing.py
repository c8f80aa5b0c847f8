"""The wellbeing watch's alert rule (allinone_gguf/wellbeing.py): pure, table-driven."""
import datetime

import pytest

from allinone_gguf.wellbeing import AlertRule, Message, active_alert, alerts, negative_share

DAY = datetime.datetime(2026, 11, 1, 9)


def msgs(flags, conf=0.9, days=None):
    return [Message(i, None if days is None else DAY + datetime.timedelta(days=days[i], minutes=i), bool(n), conf)
            for i, n in enumerate(flags)]


@pytest.mark.parametrize("flags, expected", [
    ([0, 0, 0, 0, 0], []),
    ([1, 1, 0, 0, 0, 0, 1], []),                       # never 3 within 5
    ([1, 1, 1], [(0, 2, (0, 1, 2))]),
    ([1, 0, 1, 0, 1, 1, 0, 0], [(0, 6, (0, 2, 4))]),    # still holds at 5 and 6 (2, 4, 5 in the window)
    ([1, 1, 1, 0, 0, 0, 0, 1, 1, 1], [(0, 4, (0, 1, 2)), (7, 9, (7, 8, 9))]),
])
def test_window_rule(flags, expected):
    assert [(a.since, a.until, a.messages) for a in alerts(msgs(flags), AlertRule(streak_days=0))] == expected


def test_confidence_below_the_bar_does_not_count():
    assert alerts(msgs([1, 1, 1], conf=0.7), AlertRule(streak_days=0)) == []
    assert len(alerts(msgs([1, 1, 1], conf=0.7), AlertRule(streak_days=0, min_confidence=0.6))) == 1


def test_streak_of_days_fires_when_the_window_does_not():
    # one negative message a day among positives never meets 3 of 5 ... but each day alone is negative
    rule = AlertRule(window=5, negatives=5, streak_days=3)
    found = alerts(msgs([1, 1, 1], days=[0, 1, 2]), rule)
    assert [(a.since, a.until, a.messages) for a in found] == [(0, 2, (0, 1, 2))]
    assert "3 days in a row" in found[0].reason
    assert alerts(msgs([1, 1, 1], days=[0, 1, 3]), rule) == []       # a gap day breaks the streak
    assert alerts(msgs([1, 0, 0, 1, 1], days=[0, 1, 1, 2, 3]), rule) == []   # day 1 mostly positive


def test_active_alert_only_while_it_holds():
    assert active_alert(msgs([1, 1, 1])) is not None
    assert active_alert(msgs([1, 1, 1, 0, 0, 0])) is None
    assert active_alert([]) is None


def test_negative_share_is_rolling():
    assert negative_share(msgs([1, 1, 0, 0]), AlertRule(trend_window=2)) == [1.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("kw", [dict(negatives=6), dict(negatives=0), dict(min_confidence=0.3),
                                dict(streak_days=-1), dict(trend_window=0)])
def test_rule_is_checked(kw):
    with pytest.raises(ValueError):
        AlertRule(**kw)
