"""Offline Gradio app and HTTP API for Qwen All-in-One: a sentiment badge at once, then a streamed reply.

It only wires Gradio to the runtime (allinone_gguf); it makes no request outside the machine: no analytics,
no share link, no CDN. One model serves every session, so model work queues (one event at a time).

    python app.py                                   # default model, http://127.0.0.1:7860
    python app.py --model models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q8_0.gguf --port 7861

HTTP API (named endpoints `classify` and `respond`):

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    label, confidence, reply = client.predict("今天的实验终于成功了!", [], api_name="/respond")
"""

import os  # no `from __future__ import annotations`: gr.api reads the real type hints

# Before gradio is imported: its analytics and version check would call out to the internet.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import dataclasses
import functools
import logging
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import gradio as gr

from allinone_gguf import AllInOne, ModelLoadError, Settings
from allinone_gguf.runtime.config import field_help
from allinone_gguf.faces.ui_helpers import (
    LANGUAGE_CHOICES,
    AppSettings,
    assistant_text,
    badge,
    content_text,
    history_from_chat,
    is_loopback,
    list_models,
    model_name,
    mood_point,
    mood_svg,
)

log = logging.getLogger("app")
MODEL_QUEUE = "model"  # concurrency group of every event that touches the model: one at a time
# The line under the chat: where the current turn is (tests wait on these too).
WAITING, REPLYING, DONE, STOPPED = "… waiting for the model", "… replying", "✓ done", "■ stopped"
# Seconds between chat updates while a reply streams: the browser re-renders the whole message on each
# update, so one per token makes long replies lag behind the model (and run on after Stop).
REFRESH_S = 0.1
SAME = (gr.skip(), gr.skip(), gr.skip())  # mood state, mood chart and turn status unchanged


def _app_help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(AppSettings) if f.name == name)


class ModelSlot:
    """The one loaded model, shared by all sessions. Switching loads the new file once, then closes the old."""

    def __init__(self, path: Path, models_dir: Path, settings: Settings):
        self.models_dir, self.settings = Path(models_dir), settings
        self._lock = threading.Lock()
        self.bot = AllInOne(path, settings)
        log.info("loaded %s", path)
        self.start_path = Path(path).resolve()

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
            new = AllInOne(path, self.settings)
            old, self.bot = self.bot, new
        old.close()
        log.info("loaded %s", path)
        return True

    def status(self) -> str:
        return f"**Model:** `{model_name(Path(self.current()), self.models_dir)}`"


def add_user(message: str, chat: list):
    """Show the user's message at once (not queued) and clear the box; an empty box stops the chain."""
    if not (message or "").strip():
        raise gr.Error("Type a message first. / 请先输入一句话。", duration=3)
    return "", chat + [{"role": "user", "content": message.strip()}], WAITING


def answer(slot: ModelSlot, chat: list, mood: list, lang: str, temperature: float, max_tokens: float):
    """One assistant turn for the last (user) message of the chat: badge and mood chart first, then the
    reply piece by piece. Stop makes Gradio close this generator, which closes the stream and frees the model."""
    text = content_text(chat[-1]["content"]) if chat and chat[-1]["role"] == "user" else ""
    history = history_from_chat(chat[:-1])
    bot = slot.bot
    try:
        sentiment = bot.classify(text, labels=lang)
    except (ValueError, TypeError, ModelLoadError) as e:
        raise gr.Error(str(e)) from e
    line = badge(sentiment.label, sentiment.confidence, sentiment.is_negative, lang)
    mood = mood + [mood_point(len(mood) + 1, sentiment.label, sentiment.probs, bot.label_set(lang)[0])]
    yield chat + [{"role": "assistant", "content": line}], mood, mood_svg(mood), REPLYING
    reply, last = "", float("-inf")  # the first piece shows at once
    stream = bot.stream_reply(text, history=history, sentiment=sentiment,
                              temperature=float(temperature), max_tokens=int(max_tokens))
    try:
        with closing(stream):
            for piece in stream:
                reply += piece
                if time.monotonic() - last >= REFRESH_S:
                    yield chat + [{"role": "assistant", "content": assistant_text(line, reply)}], *SAME
                    last = time.monotonic()
    except GeneratorExit:
        log.info("reply stopped after %d characters", len(reply))
        raise
    log.info("reply finished after %d characters", len(reply))
    yield chat + [{"role": "assistant", "content": assistant_text(line, reply)}], gr.skip(), gr.skip(), DONE


def build_app(slot: ModelSlot) -> gr.Blocks:
    s = slot.settings
    ui = AppSettings()

    def switch_model(path: str):
        try:
            slot.switch(path)
        except (ValueError, TypeError, ModelLoadError) as e:
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
        except (ValueError, TypeError, ModelLoadError) as e:
            raise gr.Error(str(e)) from e
        return sentiment.label, float(sentiment.confidence)

    def respond(text: str, history: list[dict] | None = None, labels: str = s.labels,
                temperature: float = s.temperature, max_tokens: int = s.max_tokens,
                seed: int | None = None) -> tuple[str, float, str]:
        """(label, confidence, full reply) for `text` after `history` ([{"role", "content"}], oldest first)."""
        bot = slot.bot
        try:
            sentiment = bot.classify(text, labels=labels)
            reply = bot.reply(text, history=history or [], sentiment=sentiment, temperature=temperature,
                              max_tokens=max_tokens, seed=seed)
        except (ValueError, TypeError, ModelLoadError) as e:
            raise gr.Error(str(e)) from e
        return sentiment.label, float(sentiment.confidence), reply

    with gr.Blocks(title="Qwen All-in-One (GGUF)", analytics_enabled=False) as demo:
        gr.Markdown("## Qwen All-in-One (GGUF)\nOne small Qwen model on the CPU: first a sentiment "
                    "judgement (正面/负面 with its confidence), then an empathetic reply.")
        with gr.Row():
            with gr.Column(scale=3):
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

        quiet = dict(api_visibility="private", show_progress="hidden")  # UI events: not part of the HTTP API
        turn = dict(fn=functools.partial(answer, slot), inputs=[chat, mood, lang, temperature, max_tokens],
                    outputs=[chat, mood, plot, progress], concurrency_id=MODEL_QUEUE, **quiet)
        show = dict(fn=add_user, inputs=[box, chat], outputs=[box, chat, progress], queue=False, **quiet)
        replies = [box.submit(**show).success(**turn), send.click(**show).success(**turn)]
        stop.click(lambda: STOPPED, outputs=[progress], cancels=replies, queue=False, **quiet)
        for clearing in (clear.click, chat.clear):  # the Clear button and the chat's own bin icon
            clearing(lambda: ([], [], mood_svg([]), ""), outputs=[chat, mood, plot, progress], cancels=replies,
                     queue=False, **quiet)
        model.input(switch_model, inputs=[model], outputs=[status], concurrency_id=MODEL_QUEUE,
                    api_visibility="private")
        demo.load(on_load, outputs=[model, status], queue=False, **quiet)
        gr.api(classify, api_name="classify", concurrency_id=MODEL_QUEUE)
        gr.api(respond, api_name="respond", concurrency_id=MODEL_QUEUE)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ui = AppSettings()
    p = argparse.ArgumentParser(description="Offline Gradio app and HTTP API for Qwen All-in-One (GGUF).")
    for name in ("model", "models_dir", "host", "port"):
        default = getattr(ui, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{_app_help(name)} (default: {default})")
    for name in ("n_threads", "n_ctx"):  # load-time knobs; the per-reply ones are UI controls
        default = getattr(Settings(), name)
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                       help=f"{field_help(name)} (default: {default})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log.addHandler(logging.StreamHandler(sys.stdout))  # model loads, one line each, for the operator
    log.setLevel(logging.INFO)
    if not is_loopback(args.host):
        print(f"warning: binding to {args.host}: the app has no login, anyone who can reach this port can use it",
              file=sys.stderr)
    try:
        slot = ModelSlot(args.model, args.models_dir, Settings(n_threads=args.n_threads, n_ctx=args.n_ctx))
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_app(slot)
    demo.queue(default_concurrency_limit=1, max_size=64)
    try:
        # Nothing that reaches out: no share tunnel, no node SSR server, no MCP, no PWA, no run history.
        demo.launch(server_name=args.host, server_port=args.port, share=False, quiet=True, prevent_thread_lock=True,
                    ssr_mode=False, mcp_server=False, pwa=False, run_history=False,
                    footer_links=["api", "settings"])
    except OSError as e:  # port taken
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    print(f"Qwen All-in-One is ready: {demo.local_url}", flush=True)
    try:
        demo.block_thread()
    finally:
        slot.bot.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
