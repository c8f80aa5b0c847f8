"""The wellbeing watch for one conversation, shared by the page and the API: its labelled user messages give the
alert (allinone_gguf/wellbeing.py's rule), the reply's gentle check-in (the runtime's `care` option) and the trend.

    >>> from allinone_gguf.wellbeing import AlertRule, Message
    >>> msgs = [Message(i, None, negative=True, confidence=0.9) for i in (0, 2, 4)]   # keys: indices in `messages`
    >>> trend = trend_json(msgs, AlertRule())      # the API's "wellbeing" object
    >>> trend["negative_share"], trend["alert"]["since"], trend["alert"]["messages"]
    (1.0, 0, [0, 2, 4])

The rule itself is wellbeing.py's (AlertRule, defaults written there); this module only turns the runtime's
Sentiment into the rule's Message and the rule's Alert into what the faces show.
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Iterable

from ..wellbeing import AlertRule, Message, active_alert, negative_share


def labelled(key: object, sentiment: Any, time: datetime.datetime | None = None) -> Message:
    """The rule's Message for one user message from the runtime's Sentiment (its label and that label's confidence)."""
    return Message(key, time, bool(sentiment.is_negative), float(sentiment.confidence))


def check_in(earlier: Iterable[Message], key: object, rule: AlertRule,
             time: datetime.datetime | None = None) -> bool | Callable[[Any], bool]:
    """The runtime's `care` option for a new message after `earlier`: whether the alert holds once the message's
    label joins them, so the reply to the very message that starts an alert already checks in.

    All the label decides is whether the message counts (negative at min_confidence). When both ways give the same
    answer it is a bool, and respond() decodes the whole prompt beside the label as always; otherwise a function,
    which respond() asks once the label is read (on its worker thread; this one is pure and quick), and the prompt
    from the check-in turn on waits for the label."""
    earlier = list(earlier)
    if_counts, if_not = (active_alert([*earlier, Message(key, time, negative, 1.0)], rule) is not None
                         for negative in (True, False))
    if if_counts == if_not:
        return if_counts

    def care(sentiment) -> bool:
        return sentiment is not None and active_alert([*earlier, labelled(key, sentiment, time)], rule) is not None
    return care


def trend_json(msgs: list[Message], rule: AlertRule) -> dict:
    """The API's `wellbeing` object: the rolling share of counting negatives at the last message (over the rule's
    `trend_window` messages) and the alert that holds there (None), with the keys of the messages that fired it."""
    alert = active_alert(msgs, rule)
    return {"negative_share": negative_share(msgs, rule)[-1] if msgs else 0.0,
            "alert": None if alert is None else {"since": alert.since, "reason": alert.reason,
                                                 "messages": list(alert.messages)}}
