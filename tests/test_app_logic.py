"""The app's wiring and its page (faces/page.py, faces/sessions.py) against a fake runtime: model switching loads once, a turn streams, Stop closes the stream.

The wellbeing watch: the page notes a strongly negative stretch, the replies check in while it holds."""
from dataclasses import dataclass, field

import gradio as gr
import pytest

import app
from allinone_gguf.faces import page
from conftest import ROOT, FakeRuntime
from allinone_gguf.faces import sessions
from allinone_gguf.faces.ui_helpers import BADGE_RE, badge
from allinone_gguf.runtime.prompts import LABEL_SETS


@dataclass
class FakeSentiment:
    label: str
    confidence: float
    probs: dict
    is_negative: bool
    source: str = "grammar"


@dataclass
class FakeBot(FakeRuntime):
    """Records loads, calls and closes; respond's stream yields `pieces` and notes when it was closed."""
    model_path: object
    settings: object = None
    pieces: tuple = ("你", "好", "呀", "！")
    calls: list = field(default_factory=list)
    closed: bool = False
    stream_closed: bool = False
    loads = []

    def __post_init__(self):
        FakeBot.loads.append(str(self.model_path))

    def label_set(self, labels=None):
        return ("Positive", "Negative") if labels == "en" else ("正面", "负面")

    def classify(self, text, labels=None):
        """负面 75 %, but 负面 95 % for a text with 难过 and 正面 90 % for one with 开心."""
        if not text.strip():
            raise ValueError("text is empty")
        pos, neg = self.label_set(labels)
        if "开心" in text:
            return FakeSentiment(pos, 0.9, {pos: 0.9, neg: 0.1}, False)
        p = 0.95 if "难过" in text else 0.75
        return FakeSentiment(neg, p, {pos: 1 - p, neg: p}, True)

    def respond(self, text, history=None, labels=None, temperature=None, max_tokens=None, seed=None,
                conversation=None, care=False):
        sentiment = self.classify(text, labels)
        # the runtime asks a care function once the label is read; `care` records what it decided
        self.calls.append(dict(text=text, history=history, temperature=temperature, max_tokens=max_tokens,
                               conversation=conversation, care=care(sentiment) if callable(care) else care))
        bot = self

        class Stream:
            pieces = iter(self.pieces)

            def sentiment(self):
                return sentiment

            def __iter__(self):
                return self.pieces

            def close(self):
                bot.stream_closed = True

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()
        return Stream()

    def close(self):
        self.closed = True


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setattr(sessions, "AllInOne", FakeBot)
    FakeBot.loads = []
    (tmp_path / "m").mkdir()
    paths = {q: tmp_path / "m" / f"tiny-{q}.gguf" for q in ("Q4_K_M", "Q8_0")}
    for p in paths.values():
        p.write_bytes(b"")
    return paths


def test_switch_loads_once_and_closes_the_old_model(models, tmp_path):
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    first = slot.bot
    assert slot.switch(str(models["Q4_K_M"])) is False  # already loaded: no reload
    assert slot.switch(str(models["Q8_0"])) is True
    assert first.closed and not slot.bot.closed
    assert slot.switch(str(models["Q8_0"])) is False
    assert FakeBot.loads == [str(models["Q4_K_M"]), str(models["Q8_0"])]
    assert "tiny-Q8_0.gguf" in slot.status()


def test_switch_refuses_files_outside_the_models_folder(models, tmp_path):
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    stray = tmp_path / "stray.gguf"
    stray.write_bytes(b"")
    with pytest.raises(ValueError, match="not a model under"):
        slot.switch(str(stray))
    assert len(FakeBot.loads) == 1


def session_with(chat, *pending) -> sessions.Session:
    session = sessions.Session()
    session.chat = list(chat)
    session.pending.extend(pending)
    return session


def test_a_turn_shows_the_badge_first_then_streams_with_clean_history(models, tmp_path, monkeypatch):
    monkeypatch.setattr(page, "REFRESH_S", 0.0)  # one chat update per piece
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    earlier = [{"role": "user", "content": [{"type": "text", "text": "早上好"}]},
               {"role": "assistant", "content": badge("正面", 0.9, False) + "\n\n早！"}]
    session = session_with(earlier, "考试没过")
    steps = list(page.answer(slot, session, [], "zh", 0.5, 64.0))
    first_chat, mood, svg, status, note, dismiss = steps[0]
    assert not note.visible and not dismiss.visible             # one message at 75 %: no alert
    assert first_chat[-1] == {"role": "assistant", "content": "😢 LLM 情感判断: 负面 (置信度 75%)"}
    assert first_chat[-2] == {"role": "user", "content": "考试没过"}
    assert mood == [{"turn": 1, "mood": -0.5, "label": "负面"}] and 'data-label="负面"' in svg
    assert status == page.REPLYING
    streamed = [s[0][-1]["content"] for s in steps[1:]]
    assert [BADGE_RE.sub("", text) for text in streamed] == ["你", "你好", "你好呀", "你好呀！", "你好呀！"]
    assert steps[-1][3] == page.DONE and all(s[3] is not page.DONE for s in steps[:-1])
    call = slot.bot.calls[0]
    assert call["text"] == "考试没过" and call["max_tokens"] == 64 and isinstance(call["max_tokens"], int)
    assert call["history"] == [{"role": "user", "content": "早上好"}, {"role": "assistant", "content": "早！"}]
    assert call["conversation"] == session.conversation


def test_chat_updates_are_throttled_but_the_first_piece_and_the_end_always_show(models, tmp_path, monkeypatch):
    monkeypatch.setattr(page, "REFRESH_S", 3600.0)
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    steps = list(page.answer(slot, session_with([], "hi"), [], "zh", 0.7, 32))
    assert [BADGE_RE.sub("", s[0][-1]["content"]) for s in steps[1:]] == ["你", "你好呀！"]


def test_a_message_sent_during_a_reply_waits_in_view_and_is_answered_next(models, tmp_path, monkeypatch):
    monkeypatch.setattr(page, "REFRESH_S", 0.0)
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    session = sessions.Session()
    page.add_user("再说一遍好吗？", session)
    turn = page.answer(slot, session, [], "zh", 0.7, 32)
    next(turn), next(turn)                                   # badge, first piece of the first reply
    box, shown, status = page.add_user("我又发了一条。", session)  # typed while the reply streams
    assert box == "" and shown[-1] == {"role": "user", "content": "我又发了一条。"} and page.QUEUED in status
    assert list(page.answer(slot, session, [], "zh", 0.7, 32)) == []    # a second answer leaves it to the first
    steps = list(turn)
    users = [m["content"] for m in steps[-1][0] if m["role"] == "user"]
    assert users == ["再说一遍好吗？", "我又发了一条。"]
    assert [c["text"] for c in slot.bot.calls] == ["再说一遍好吗？", "我又发了一条。"]
    assert slot.bot.calls[1]["history"][0] == {"role": "user", "content": "再说一遍好吗？"}
    assert not session.pending and not session.running


def test_stop_closes_the_runtime_stream_and_gives_waiting_messages_back(models, tmp_path):
    """Gradio's cancel calls close() on the turn's generator; the model's stream must be closed with it."""
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    session = session_with([], "hi")
    turn = page.answer(slot, session, [], "en", 0.7, 32)
    next(turn), next(turn)  # badge, first piece
    page.add_user("one more", session)
    assert not slot.bot.stream_closed
    turn.close()
    assert slot.bot.stream_closed and not session.running
    box, shown, status = page.stop_turn(session)
    assert box == "one more" and status == page.STOPPED and not session.pending


def test_empty_messages_are_refused_before_the_queue():
    session = sessions.Session()
    with pytest.raises(gr.Error):
        page.add_user("   ", session)
    assert page.add_user(" hi ", session) == ("", [{"role": "user", "content": "hi"}], page.WAITING)


def test_cli_defaults_come_from_the_settings_dataclasses():
    args = app.parse_args([])
    assert args.ui == app.AppSettings() and args.load == {}
    args = app.parse_args(["--port", "7999", "--parallel", "3", "--models-dir", "elsewhere"])
    assert (args.ui.port, str(args.ui.models_dir), args.load) == (7999, "elsewhere", {"parallel": 3})
    assert app.Settings(**args.load).parallel == 3


def test_session_queue_keeps_every_message_in_order_and_one_turn_loop():
    s = sessions.Session()
    assert s.push("一") is False and s.begin() is True
    assert s.push("二") is True                                # a loop runs: it will take this one next
    assert s.begin() is False                                  # a second loop does not start
    assert s.next_message() == "一" and s.shown()[-1] == {"role": "user", "content": "二"}
    assert "2" not in s.status("x") and sessions.Session.QUEUED in s.status("x")
    assert s.take_waiting() == "二" and s.next_message() is None and s.begin() is True   # Stop gave it back
    s.end()
    s.chat = [{"role": "user", "content": "一"}]
    s.push("三")
    assert s.take_waiting(clear_chat=True) == "三" and s.chat == [] and s.shown() == []


def test_a_fake_that_drifts_from_the_runtime_fails_at_once():
    with pytest.raises(TypeError, match="does not match AllInOne.classify"):
        class Swapped(FakeRuntime):
            def classify(self, labels, text):
                pass
    with pytest.raises(TypeError, match="does not match AllInOne.label_set"):
        class Renamed(FakeRuntime):
            def label_set(self, lang=None):
                pass


def test_the_api_alone_loads_no_gradio():
    import subprocess
    import sys
    code = ("import sys, app\n"
            "args = app.parse_args(['--no-page'])\n"
            "assert args.ui.page is False\n"
            "print('gradio' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


# -- the wellbeing watch (allinone_gguf/wellbeing.py's rule, faces/care.py) ---------------------------------------
def notes(steps) -> list:
    """Per turn, the note its badge step showed: its HTML, or None when hidden."""
    badge_steps = [s for s in steps if s[4] != gr.skip()]
    return [s[4].value if s[4].visible else None for s in badge_steps]


def run_turns(slot, session, texts, mood=(), lang="zh"):
    """(each turn's note, the mood chart's points after them) of answering `texts` after the points `mood`."""
    session.pending.extend(texts)
    steps = list(page.answer(slot, session, list(mood), lang, 0.7, 32))
    return notes(steps), [s[1] for s in steps if s[1] != gr.skip()][-1]


def test_the_watch_notes_a_strongly_negative_stretch_checks_in_while_it_holds_and_clears(models, tmp_path):
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    session = sessions.Session()
    texts = ["我好难过", "还是难过", "考试没过", "今天也难过", "开心", "开心", "开心"]
    shown, _ = run_turns(slot, session, texts)
    # 75 % (考试没过) does not count: the alert fires at the 4th message (1, 2, 4 of the last 5 at >= 80 %), holds
    # at the 5th, and ends at the 6th (of its last 5, only 2 and 4 count)
    assert [n is not None for n in shown] == [False, False, False, True, True, False, False]
    assert "第 1、2、4 轮" in shown[3] and "心情" in shown[3]
    assert [c["care"] for c in slot.bot.calls] == [False, False, False, True, True, False, False]
    assert [s.key for s in session.labelled] == [1, 2, 3, 4, 5, 6, 7]       # the mood chart's turn numbers
    for label in (*LABEL_SETS["zh"], *LABEL_SETS["en"], "75", "95", "置信"):
        assert all(label not in n for n in shown if n), label                  # the note names no label, no score


def test_a_dismissed_note_stays_hidden_until_a_new_stretch_starts(models, tmp_path):
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    session = sessions.Session()
    shown, mood = run_turns(slot, session, ["难过一", "难过二", "难过三"])
    assert shown[-1] and "第 1、2、3 轮" in shown[-1]
    note, button = page.dismiss_note(session)
    assert not note.visible and not button.visible
    shown, mood = run_turns(slot, session, ["难过四", "开心", "开心", "开心"], mood)
    assert shown == [None] * 4                                                 # dismissed, then over (at 开心 #3)
    assert [c["care"] for c in slot.bot.calls[3:]] == [True, True, True, False]   # the replies still check in
    shown, _ = run_turns(slot, session, ["难过五", "难过六", "难过七"], mood, lang="en")
    assert shown[:2] == [None, None] and "turns 8, 9, 10" in shown[2]          # a new stretch shows again, in English


def test_clear_starts_the_watch_afresh_and_no_wellbeing_turns_it_off(models, tmp_path):
    slot = sessions.ModelSlot(models["Q4_K_M"], tmp_path / "m", settings=None)
    session = sessions.Session()
    run_turns(slot, session, ["难过一", "难过二", "难过三"])
    *_, note, button = page.clear_chat(session)
    assert not note.visible and not button.visible and session.labelled == []
    shown, _ = run_turns(slot, session, ["难过一", "难过二"])
    assert shown == [None, None]                                               # two after Clear: no alert yet
    off = sessions.Session(rule=None)                                          # app.py --no-wellbeing
    shown, _ = run_turns(slot, off, ["难过一", "难过二", "难过三", "难过四"])
    assert shown == [None] * 4 and [c["care"] for c in slot.bot.calls[-4:]] == [False] * 4
    assert app.parse_args(["--no-wellbeing"]).ui.wellbeing is False and app.AppSettings().wellbeing is True
