"""The app's state without Gradio: the one loaded model (switchable) and each browser session's conversation.

    >>> from allinone_gguf.faces.sessions import Session
    >>> s = Session()
    >>> s.push("你好"), s.begin(), s.next_message(), s.next_message()
    (False, True, '你好', None)

`ModelSlot` holds the model every session shares; switching loads the new file once, then closes the old.
`Session` is one browser session: its conversation id (the runtime keeps a KV slot for it), the chat as shown,
the messages typed while a reply runs, answered in order by one turn loop at a time (faces/page.py drives it), and
the wellbeing watch over its user messages' labels (faces/care.py: the alert, the note, the reply's check-in).
"""
from __future__ import annotations

import datetime
import logging
import threading
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ..runtime import AllInOne, ModelLoadError, QueueFull, Settings
from ..wellbeing import Alert, AlertRule, Message, active_alert
from .care import check_in, labelled
from .ui_helpers import list_models, model_name

log = logging.getLogger("app")
# What a request can fail with that its sender should read (a bad text, a full queue, a model that will not
# load); anything else is a bug and goes to the log.
USER_ERRORS = (ValueError, TypeError, ModelLoadError, QueueFull)


class ModelSlot:
    """The one loaded model, shared by all sessions. Switching loads the new file once, then closes the old."""

    def __init__(self, path: Path, models_dir: Path, settings: Settings | None):
        self.models_dir, self.settings = Path(models_dir), settings
        self._lock = threading.Lock()
        self.bot = AllInOne(path, settings)
        log.info("loaded %s", path)
        self.start_path = Path(path).resolve()
        self.ready = threading.Event()     # /health: 503 until set (and while a switch loads)
        self.ready.set()

    def choices(self) -> list[tuple[str, str]]:
        """The model menu: *.gguf under models_dir, plus the file given on the command line."""
        return list_models(self.models_dir, extra=[self.start_path])

    def current(self) -> str:
        return str(Path(self.bot.model_path).resolve())

    def switch(self, path: str) -> bool:
        """Load `path` (one of choices()) unless it is already loaded; True when a load happened."""
        with self._lock:
            if str(Path(path).resolve()) == self.current():
                return False
            if str(Path(path).resolve()) not in {value for _, value in self.choices()}:
                raise ValueError(f"{path}: not a model under {self.models_dir}")
            self.ready.clear()
            try:
                new = AllInOne(path, self.settings)
            finally:
                self.ready.set()
            old, self.bot = self.bot, new
        old.close()
        log.info("loaded %s", path)
        return True

    def status(self) -> str:
        return f"**Model:** `{model_name(Path(self.current()), self.models_dir)}`"


class Session:
    """One browser session's conversation. Messages typed while a reply runs wait in `pending`, shown in the chat
    at once, and are answered in order; only one turn loop runs per session (begin() says whether to start)."""

    QUEUED = "⏳ waiting to be sent: "   # the status line's note of messages typed while a reply runs

    def __init__(self, rule: AlertRule | None = AlertRule()):
        self.conversation = uuid.uuid4().hex
        self.chat: list[dict] = []
        self.pending: deque[str] = deque()
        self.lock = threading.Lock()
        self.running = False
        self.rule = rule                        # the wellbeing watch's rule; None = no watch (app.py --no-wellbeing)
        self.labelled: list[Message] = []       # the user messages' labels, keyed by turn (the mood chart's numbers)
        self.dismissed = False                  # the note of the alert that holds now was dismissed

    def __deepcopy__(self, memo) -> "Session":   # Gradio copies the State's default for every new session
        return Session(self.rule)

    def push(self, text: str) -> bool:
        """Queue a message; True when a turn loop is running already (it will take it next)."""
        with self.lock:
            self.pending.append(text)
            return self.running

    def begin(self) -> bool:
        """Claim the session's turn loop; False when one runs already."""
        with self.lock:
            if self.running:
                return False
            self.running = True
            return True

    def next_message(self) -> str | None:
        """The next waiting message, or None, which also ends the turn loop."""
        with self.lock:
            if not self.pending:
                self.running = False
                return None
            return self.pending.popleft()

    def end(self) -> None:
        with self.lock:
            self.running = False

    def take_waiting(self, clear_chat: bool = False) -> str:
        """Stop or Clear: the waiting messages leave the queue (back to the message box, one per line). Clear also
        starts the wellbeing watch afresh."""
        with self.lock:
            waiting = list(self.pending)
            self.pending.clear()
            if clear_chat:
                self.chat, self.labelled, self.dismissed = [], [], False
        return "\n".join(waiting)

    # -- the wellbeing watch ----------------------------------------------------------------------------------------
    def check_in(self, turn: int, when: datetime.datetime) -> bool | Callable[[Any], bool]:
        """The runtime's `care` for this turn's message: whether the alert holds once its label is read (the reply
        then checks in gently); False without a watch."""
        return False if self.rule is None else check_in(self.labelled, turn, self.rule, when)

    def label(self, turn: int, sentiment: Any, when: datetime.datetime) -> Alert | None:
        """Record this turn's label; the alert whose note the page shows now: None when none holds, or when the
        user dismissed it (a dismissal lasts until the alert stops holding; the next stretch shows again)."""
        if self.rule is None:
            return None
        with self.lock:
            self.labelled.append(labelled(turn, sentiment, when))
            alert = active_alert(self.labelled, self.rule)
            if alert is None:
                self.dismissed = False
            return None if alert is None or self.dismissed else alert

    def dismiss(self) -> None:
        """The note's dismiss button: hide the alert that holds now (there is one while the button shows)."""
        with self.lock:
            self.dismissed = self.rule is not None and active_alert(self.labelled, self.rule) is not None

    def shown(self) -> list[dict]:
        """The chat plus the waiting messages, so nothing typed ever disappears from the page."""
        return self.chat + [{"role": "user", "content": text} for text in self.pending]

    def status(self, line: str) -> str:
        return line + (f"  \n{self.QUEUED}{len(self.pending)}" if self.pending else "")
