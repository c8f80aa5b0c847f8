"""The wellbeing watch's rule: when does a person's run of messages call for someone to check in (持续出现负面情绪 →
触发预警机制)? Pure logic over labelled messages, shared by `python -m allinone_gguf watch` (a file of many people)
and the app (one conversation).

A message *counts* when it is negative with confidence >= `min_confidence`. An alert fires when
- `negatives` of the last `window` messages count (default: 3 of the last 5, confidence >= 0.8), or
- on `streak_days` calendar days in a row most of the day's messages count (default 3 days; needs times).
It lasts while either still holds; the messages that made it fire are kept, so every alert is explained.

    >>> from allinone_gguf.wellbeing import AlertRule, Message, alerts
    >>> msgs = [Message(i, None, negative=n, confidence=0.9) for i, n in enumerate([0, 1, 1, 0, 1, 0, 0, 0, 0])]
    >>> [(a.since, a.until, a.messages) for a in alerts(msgs, AlertRule())]
    [(1, 5, (1, 2, 4))]
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AlertRule:
    """When to alert, with the defaults written once (the watch command's flags and the app read these)."""

    window: int = field(default=5, metadata={"help": "messages the count looks back over"})
    negatives: int = field(default=3, metadata={"help": "counting negatives within the window that fire an alert"})
    min_confidence: float = field(default=0.8, metadata={
        "help": "confidence a negative needs to count (0.5 counts every negative)"})
    streak_days: int = field(default=3, metadata={
        "help": "calendar days in a row whose messages are mostly counting negatives that fire an alert "
                "(needs times; 0 turns this rule off)"})
    trend_window: int = field(default=5, metadata={"help": "messages the rolling share of negatives is taken over"})

    def __post_init__(self):
        if not (1 <= self.negatives <= self.window):
            raise ValueError(f"the alert rule needs 1 <= negatives <= window, got {self.negatives} of {self.window}")
        if not 0.5 <= self.min_confidence <= 1 or self.streak_days < 0 or self.trend_window < 1:
            raise ValueError("the alert rule needs min_confidence in [0.5, 1], streak_days >= 0, trend_window >= 1")


@dataclass(frozen=True)
class Message:
    """One labelled message of one person: `key` is how the caller finds it again (a row number, a turn)."""

    key: object
    time: datetime.datetime | None
    negative: bool
    confidence: float    # of the label given, 0.5..1


@dataclass(frozen=True)
class Alert:
    since: object                 # key of the first message that made it fire
    until: object                 # key of the last message while it held
    messages: tuple               # keys of the counting negatives that made it fire
    reason: str                   # which rule, in words


def counts(m: Message, rule: AlertRule) -> bool:
    return m.negative and m.confidence >= rule.min_confidence


def negative_share(msgs: list[Message], rule: AlertRule) -> list[float]:
    """The share of counting negatives among each message's last `trend_window` messages (itself included).

        >>> negative_share([Message(i, None, n, 0.9) for i, n in enumerate([1, 0, 1])], AlertRule(trend_window=2))
        [1.0, 0.5, 0.5]
    """
    flags = [counts(m, rule) for m in msgs]
    out = []
    for i in range(len(flags)):
        seen = flags[max(0, i - rule.trend_window + 1):i + 1]
        out.append(round(sum(seen) / len(seen), 4))
    return out


def _day_streaks(msgs: list[Message], rule: AlertRule) -> dict[int, tuple]:
    """{index of a day's last message: keys of the streak's counting negatives} for each day that completes
    `streak_days` negative days in a row."""
    if not rule.streak_days:
        return {}
    days: dict[datetime.date, list[int]] = {}
    for i, m in enumerate(msgs):
        if m.time is not None:
            days.setdefault(m.time.date(), []).append(i)
    out, run = {}, []
    for day in sorted(days):
        idx = days[day]
        negative_day = sum(counts(msgs[i], rule) for i in idx) * 2 > len(idx)
        run = (run if run and day - run[-1][0] == datetime.timedelta(days=1) else []) + [(day, idx)] \
            if negative_day else []
        if len(run) >= rule.streak_days:
            streak = run[-rule.streak_days:]
            out[idx[-1]] = tuple(msgs[i].key for _, ii in streak for i in ii if counts(msgs[i], rule))
    return out


def alerts(msgs: list[Message], rule: AlertRule = AlertRule()) -> list[Alert]:
    """The alerts of one person's messages (in time order): one per stretch in which a rule holds."""
    streaks = _day_streaks(msgs, rule)
    out: list[Alert] = []
    open_: dict | None = None
    for i, m in enumerate(msgs):
        recent = [x for x in msgs[max(0, i - rule.window + 1):i + 1] if counts(x, rule)]
        fired = []
        if len(recent) >= rule.negatives:
            fired.append((f"{len(recent)} of the last {min(rule.window, i + 1)} messages negative with confidence "
                          f">= {rule.min_confidence}", tuple(x.key for x in recent)))
        if i in streaks:
            fired.append((f"mostly negative on {rule.streak_days} days in a row", streaks[i]))
        if fired and open_ is None:
            reason, keys = fired[0]
            open_ = {"since": keys[0], "until": m.key, "messages": keys, "reason": reason}
        elif fired:
            open_["until"] = m.key
        elif open_ is not None:
            out.append(Alert(**open_))
            open_ = None
    if open_ is not None:
        out.append(Alert(**open_))
    return out


def active_alert(msgs: list[Message], rule: AlertRule = AlertRule()) -> Alert | None:
    """The alert that still holds at the last message (the app's conversation view), or None."""
    found = alerts(msgs, rule)
    return found[-1] if found and msgs and found[-1].until == msgs[-1].key else None
