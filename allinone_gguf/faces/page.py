"""The Gradio page: a sentiment badge at once, then the streamed reply; the mood chart; the model menu.

    demo = build_app(slot)          # a gr.Blocks for one ModelSlot (faces/sessions.py); app.py mounts it at /

It makes no request outside the machine: no analytics, no share link, no CDN. Each browser session is one
conversation with its own KV slot; a message typed while the session's reply is still running waits in the
session's queue (shown under the chat) and is answered next: nothing typed is dropped. While the wellbeing watch's
alert holds (several strongly negative messages lately, allinone_gguf/wellbeing.py), a dismissible note shows above
the chat and the replies check in gently (the runtime's `care`; app.py --no-wellbeing turns both off). Gradio's named
endpoints `classify` and `respond` are defined here too. Only this module imports Gradio, so `app.py
--no-page` (the API alone) runs without it.
"""

import os  # no `from __future__ import annotations`: gr.api reads the real type hints

# Before gradio is imported: its analytics and version check would call out to the internet.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import datetime
import functools
import logging
import time
from contextlib import closing

import gradio as gr

from ..runtime.config import field_help
from ..wellbeing import AlertRule
from .defaults import AppSettings
from .sessions import USER_ERRORS, ModelSlot, Session
from .ui_helpers import (LANGUAGE_CHOICES, assistant_text, badge, history_from_chat, mood_point, mood_svg,
                         wellbeing_note)

log = logging.getLogger("app")
# The line under the chat: where the current turn is (tests wait on these too).
WAITING, REPLYING, DONE, STOPPED = "… waiting for the model", "… replying", "✓ done", "■ stopped"
QUEUED = Session.QUEUED
# Seconds between chat updates while a reply streams: the browser re-renders the whole message on each
# update, so one per token makes long replies lag behind the model (and run on after Stop).
REFRESH_S = 0.1
# Gradio events that may wait on the model at once; the runtime's own queue (Settings.max_queue) bounds the rest.
MODEL_EVENTS = 16
SAME = (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())  # mood state, chart, turn status, note, dismiss


def add_user(message: str, session: Session):
    """Queue the message and show it at once (not queued in Gradio); an empty box stops the chain."""
    if not (message or "").strip():
        raise gr.Error("Type a message first. / 请先输入一句话。", duration=3)
    busy = session.push(message.strip())
    return "", session.shown(), session.status(REPLYING) if busy else WAITING


def answer(slot: ModelSlot, session: Session, mood: list, lang: str, temperature: float, max_tokens: float):
    """Answer the session's waiting messages one after the other: for each, the badge and mood chart first, then
    the reply piece by piece. Only one answer runs per session (a second call returns at once: the running one
    takes the new message next). Stop makes Gradio close this generator, which closes the runtime's stream."""
    if not session.begin():
        return
    try:
        while (text := session.next_message()) is not None:
            history = history_from_chat(session.chat)
            session.chat.append({"role": "user", "content": text})
            mood = yield from _turn(slot, session, text, history, mood, lang, temperature, max_tokens)
    finally:
        session.end()


def note_updates(alert, lang: str):
    """The wellbeing note and its dismiss button: shown for an alert, hidden for None."""
    if alert is None:
        return gr.HTML(visible=False), gr.Button(visible=False)
    note, button = wellbeing_note(alert.messages, lang)
    return gr.HTML(note, visible=True), gr.Button(button, visible=True)


def _turn(slot, session, text, history, mood, lang, temperature, max_tokens):
    bot = slot.bot
    turn, when = len(mood) + 1, datetime.datetime.now()
    try:       # the label and the reply's prompt are decoded together; the badge shows once the label is read
        stream = bot.respond(text, history=history, labels=lang, temperature=float(temperature),
                             max_tokens=int(max_tokens), conversation=session.conversation,
                             care=session.check_in(turn, when))      # while the alert holds: check in gently
        sentiment = stream.sentiment()
    except USER_ERRORS as e:
        session.chat.pop()
        raise gr.Error(str(e)) from e
    line = badge(sentiment.label, sentiment.confidence, sentiment.is_negative, lang, sentiment.source)
    mood = mood + [mood_point(turn, sentiment.label, sentiment.probs, bot.label_set(lang)[0])]
    note = note_updates(session.label(turn, sentiment, when), lang)
    session.chat.append({"role": "assistant", "content": line})
    yield session.shown(), mood, mood_svg(mood), session.status(REPLYING), *note
    reply, last = "", float("-inf")  # the first piece shows at once
    try:
        with closing(stream):
            for piece in stream:
                reply += piece
                session.chat[-1] = {"role": "assistant", "content": assistant_text(line, reply)}
                if time.monotonic() - last >= REFRESH_S:
                    yield session.shown(), *SAME
                    last = time.monotonic()
    except GeneratorExit:
        log.info("reply stopped after %d characters", len(reply))
        raise
    log.info("reply finished after %d characters", len(reply))
    yield session.shown(), gr.skip(), gr.skip(), session.status(DONE), gr.skip(), gr.skip()
    return mood


def stop_turn(session: Session):
    """Stop: the running reply ends (Gradio cancels it); messages still waiting go back to the box, not lost."""
    return session.take_waiting(), session.shown(), STOPPED


def clear_chat(session: Session):
    return session.take_waiting(clear_chat=True), [], [], mood_svg([]), "", *note_updates(None, "zh")


def dismiss_note(session: Session):
    """The note's dismiss button: hidden until the alert stops holding and a new one starts."""
    session.dismiss()
    return note_updates(None, "zh")


def build_app(slot: ModelSlot, ui: AppSettings = AppSettings()) -> gr.Blocks:
    """The page for `slot`; `ui` gives the slider bounds and whether the wellbeing watch runs."""
    s = slot.settings

    def switch_model(path: str):
        try:
            slot.switch(path)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from e
        return slot.status()

    def on_load():
        """Each new page shows the model that is loaded now (another session may have switched it)."""
        return gr.Dropdown(choices=slot.choices(), value=slot.current()), slot.status()

    # -- HTTP API: typed functions, so gradio_client sees plain names and JSON types --
    def classify(text: str, labels: str = s.labels) -> tuple[str, float]:
        """Sentiment of `text`: (label, confidence). labels: "zh" (正面/负面) or "en" (Positive/Negative)."""
        try:
            sentiment = slot.bot.classify(text, labels=labels)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from e
        return sentiment.label, float(sentiment.confidence)

    def respond(text: str, history: list[dict] | None = None, labels: str = s.labels,
                temperature: float = s.temperature, max_tokens: int = s.max_tokens,
                seed: int | None = None) -> tuple[str, float, str]:
        """(label, confidence, full reply) for `text` after `history` ([{"role", "content"}], oldest first)."""
        try:
            with slot.bot.respond(text, history=history or [], labels=labels, temperature=temperature,
                                  max_tokens=max_tokens, seed=seed) as stream:
                sentiment, reply = stream.sentiment(), "".join(stream)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from e
        return sentiment.label, float(sentiment.confidence), reply

    with gr.Blocks(title="Qwen All-in-One (GGUF)", analytics_enabled=False) as demo:
        gr.Markdown("## Qwen All-in-One (GGUF)\nOne small Qwen model on the CPU: first a sentiment "
                    "judgement (正面/负面 with its confidence), then an empathetic reply.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):     # the wellbeing note, while the watch's alert holds
                    note = gr.HTML("", visible=False, elem_id="wellbeing-note")
                    dismiss = gr.Button("知道了", visible=False, scale=0, min_width=90, elem_id="wellbeing-dismiss")
                chat = gr.Chatbot(label="Chat", height=440, buttons=["copy", "copy_all"], feedback_options=None,
                                  elem_id="chat")
                with gr.Row():
                    box = gr.Textbox(placeholder="说点什么… / Say something…", show_label=False, scale=5,
                                     elem_id="message", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                progress = gr.Markdown("", elem_id="turn-status")
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=2):
                status = gr.Markdown(slot.status(), elem_id="model-status")
                model = gr.Dropdown(choices=slot.choices(), value=slot.current(), label="Model file",
                                    info=f"*.gguf under {slot.models_dir}/ (loads once on change)",
                                    elem_id="model")
                lang = gr.Radio(LANGUAGE_CHOICES, value=s.labels, label="Label language",
                                info=field_help("labels"), elem_id="labels")
                temperature = gr.Slider(*ui.temperature_range, value=s.temperature, step=0.05, label="Temperature",
                                        info=field_help("temperature"), elem_id="temperature")
                max_tokens = gr.Slider(*ui.max_tokens_range, value=s.max_tokens, step=1, label="Max new tokens",
                                       info=field_help("max_tokens"), elem_id="max-tokens")
                gr.Markdown("**Mood per turn** — P(positive) − P(negative)")
                plot = gr.HTML(mood_svg([]), elem_id="mood")
        mood = gr.State([])

        session = gr.State(Session(AlertRule() if ui.wellbeing else None))

        quiet = dict(api_visibility="private", show_progress="hidden")  # UI events: not part of the HTTP API
        # Sessions run side by side (the runtime batches them); within a session, answer() keeps the order.
        turn = dict(fn=functools.partial(answer, slot), inputs=[session, mood, lang, temperature, max_tokens],
                    outputs=[chat, mood, plot, progress, note, dismiss], concurrency_limit=MODEL_EVENTS,
                    trigger_mode="multiple",
                    **quiet)
        show = dict(fn=add_user, inputs=[box, session], outputs=[box, chat, progress], queue=False,
                    trigger_mode="multiple", **quiet)
        replies = [box.submit(**show).success(**turn), send.click(**show).success(**turn)]
        stop.click(stop_turn, inputs=[session], outputs=[box, chat, progress], cancels=replies, queue=False,
                   **quiet)
        for clearing in (clear.click, chat.clear):  # the Clear button and the chat's own bin icon
            clearing(clear_chat, inputs=[session], outputs=[box, chat, mood, plot, progress, note, dismiss],
                     cancels=replies, queue=False, **quiet)
        dismiss.click(dismiss_note, inputs=[session], outputs=[note, dismiss], queue=False, **quiet)
        model.input(switch_model, inputs=[model], outputs=[status], concurrency_limit=1,
                    api_visibility="private")
        demo.load(on_load, outputs=[model, status], queue=False, **quiet)
        gr.api(classify, api_name="classify", concurrency_limit=MODEL_EVENTS)
        gr.api(respond, api_name="respond", concurrency_limit=MODEL_EVENTS)
    return demo
