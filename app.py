"""Offline Gradio app and HTTP API for Qwen All-in-One: a sentiment badge at once, then a streamed reply.

It only wires the page (allinone_gguf/faces/page.py) and the OpenAI-compatible API to one loaded model
(faces/sessions.py), behind the key and the body bound (faces/http_guard.py), and runs the server. One model
serves every session; the runtime's worker queues and batches their requests.

    python app.py                                   # default model, http://127.0.0.1:7860
    python app.py --model models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q8_0.gguf --port 7861
    python app.py --no-page                          # the API alone: no Gradio loaded (~150 MB less)
    python app.py --rules docs/rules.example.txt     # /v1/classify items carry their moderation-rule matches

The page is at `/`, the OpenAI-compatible API under `/v1` (allinone_gguf/faces/openai_api.py), `/health` says
whether the model is loaded. Gradio's own named endpoints `classify` and `respond` stay:

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")       # with --api-key: headers={"Authorization": "Bearer KEY"}
    label, confidence, reply = client.predict("今天的实验终于成功了!", [], api_name="/respond")

With `--api-key KEY` (or $ALLINONE_API_KEY) every route but /health needs the key: API clients send it as a
Bearer token, a browser logs in once at /login (allinone_gguf/faces/http_guard.py). Bodies over
--max-body-bytes are refused with 413 before they are parsed.
"""

from __future__ import annotations

import os
import argparse
import logging
import sys
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from allinone_gguf import ModelLoadError, Settings
from allinone_gguf.faces.defaults import AppSettings
from allinone_gguf.faces.flags import add_dataclass_arguments, add_settings_arguments, overrides
from allinone_gguf.faces.http_guard import Guard
from allinone_gguf.faces.openai_api import build_router
from allinone_gguf.faces.rules import RuleSet, RulesError, load_rules
from allinone_gguf.faces.sessions import ModelSlot
from allinone_gguf.faces.ui_helpers import is_loopback

log = logging.getLogger("app")

APP_FLAGS = ("model", "models_dir", "host", "port", "max_body_bytes", "max_classify_texts", "rules", "page",
             "wellbeing")
# load-time knobs; per-reply ones are UI controls
LOAD_FLAGS = ("n_threads", "n_ctx", "parallel", "max_queue", "sentiment_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags from AppSettings and Settings (defaults written there once); `args.ui` and `args.load` hold the
    resulting app settings and the overrides for the runtime's Settings."""
    p = argparse.ArgumentParser(description="Offline Gradio app (at /) and OpenAI-compatible API (under /v1) for "
                                            "Qwen All-in-One (GGUF).")
    add_dataclass_arguments(p, AppSettings, APP_FLAGS, "app (defaults from allinone_gguf.faces.defaults)")
    add_settings_arguments(p, LOAD_FLAGS)
    p.add_argument("--api-key", default=os.environ.get("ALLINONE_API_KEY") or None,
                   help="require this key on every route but /health: `Authorization: Bearer KEY` from API clients, "
                        "a login form (/login) once per browser (default: $ALLINONE_API_KEY, else none)")
    args = p.parse_args(argv)
    args.ui, args.load = AppSettings(**overrides(args, APP_FLAGS)), overrides(args, LOAD_FLAGS)
    return args


def build_server(slot: ModelSlot, api_key: str | None, ui: AppSettings = AppSettings(),
                 rules: RuleSet | None = None) -> Guard:
    """One ASGI app: the OpenAI-compatible routes first, then the Gradio page mounted at /, all behind the Guard
    (the API key on every route but /health, the body size bound). `rules`: ui.rules as read at start."""
    server = FastAPI(title="Qwen All-in-One (GGUF)", docs_url=None, redoc_url=None, openapi_url=None)
    server.include_router(build_router(lambda: slot.bot, lambda: Path(slot.current()).name,
                                       is_ready=slot.ready.is_set, max_classify_texts=ui.max_classify_texts,
                                       rules=rules, wellbeing=ui.wellbeing,
                                       wellbeing_lookback=ui.wellbeing_lookback))
    app = server
    if ui.page:
        import gradio as gr

        from allinone_gguf.faces.page import build_app
        demo = build_app(slot, ui)
        demo.queue(default_concurrency_limit=1, max_size=slot.bot.settings.max_queue)   # as many as the runtime queues
        # Nothing that reaches out: no share tunnel, no node SSR server, no MCP, no PWA, no run history.
        app = gr.mount_gradio_app(server, demo, path="/", ssr_mode=False, mcp_server=False, pwa=False,
                                  run_history=False, footer_links=["api", "settings"])
    return Guard(app, api_key=api_key, max_body_bytes=ui.max_body_bytes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("app", "allinone_gguf.faces.openai_api"):   # loads, finished and cancelled replies, one line each
        logging.getLogger(name).addHandler(logging.StreamHandler(sys.stdout))
        logging.getLogger(name).setLevel(logging.INFO)
    ui = args.ui
    if not is_loopback(ui.host) and not args.api_key:
        print(f"warning: binding to {ui.host}: the app has no login and no --api-key, anyone who can reach this "
              "port can use it", file=sys.stderr)
    try:
        rules = load_rules(ui.rules) if ui.rules else None     # a bad file stops here, before the model loads
    except RulesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rules is not None:
        log.info("rules: %d from %s, matched on every /v1/classify text", len(rules), rules.source)
    try:
        slot = ModelSlot(ui.model, ui.models_dir, Settings(**args.load))
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(build_server(slot, args.api_key, ui, rules), host=ui.host, port=ui.port,
                            log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:      # port taken, or no such address
        print(f"error: cannot listen on {ui.host}:{ui.port} (see above)", file=sys.stderr)
        slot.bot.close()
        return 2
    host = f"[{ui.host}]" if ":" in ui.host else ui.host
    print(f"Qwen All-in-One is ready: http://{host}:{ui.port}/ (OpenAI-compatible API at /v1)", flush=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        server.should_exit = True
        thread.join(5)
    finally:
        slot.bot.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
