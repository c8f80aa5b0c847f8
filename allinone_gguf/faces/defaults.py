"""The defaults every face shares, written once: the model `make models` builds and `make run` loads, the
models folder and quant type (the pipeline's, from convert/defaults.py), and the app's own settings.

Standard library only, so the Makefile reads them with the system Python before the virtual env exists:

    python3 -m allinone_gguf.faces.defaults      # prints: SOURCE MODELS_DIR QUANT HOST PORT

    >>> from allinone_gguf.faces.defaults import DEFAULT_MODEL
    >>> DEFAULT_MODEL.as_posix()
    'models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf'
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from convert.defaults import DEFAULT_QUANT, DEFAULT_SOURCE, MODELS_DIR, model_file

from ..wellbeing import AlertRule


DEFAULT_MODEL = model_file(DEFAULT_SOURCE)
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """Defaults of the app itself; the model's knobs (temperature, max_tokens, labels) live in Settings."""

    model: Path = dataclasses.field(default=DEFAULT_MODEL, metadata={"help": "GGUF file loaded at start"})
    models_dir: Path = dataclasses.field(
        default=MODELS_DIR, metadata={"help": "folder whose *.gguf files the model menu offers"}
    )
    host: str = dataclasses.field(
        default=DEFAULT_HOST, metadata={"help": "address to bind; anything but loopback needs --api-key, or anyone "
                                                 "who reaches the port can use the model"}
    )
    port: int = dataclasses.field(default=DEFAULT_PORT, metadata={"help": "TCP port"})
    max_body_bytes: int = dataclasses.field(default=4 << 20, metadata={
        "help": "largest HTTP request body accepted, in bytes (HTTP 413 beyond, before anything is parsed)"})
    max_classify_texts: int = dataclasses.field(default=2048, metadata={
        "help": "most texts in one /v1/classify request (HTTP 400 beyond)"})
    rules: Path | None = dataclasses.field(default=None, metadata={
        "help": "moderation rules file: keywords and regular expressions, each with a severity (format: "
                "docs/rules-and-triage.md); each text's matches are reported beside its label and lead the triage "
                "order; the label itself never changes (none = no rules)"})
    page: bool = dataclasses.field(default=True, metadata={
        "help": "serve the Gradio page at / (--no-page: the API alone, without loading Gradio: ~150 MB less)"})
    wellbeing: bool = dataclasses.field(default=True, metadata={
        "help": "the wellbeing watch (allinone_gguf/wellbeing.py's rule): while a conversation's recent messages stay "
                "strongly negative, the page shows a dismissible note, the API's chat replies carry a `wellbeing` "
                "object, and the replies check in gently (--no-wellbeing: none of these)"})
    # User messages of one API chat request the watch reads, the last included: exactly what decides whether the
    # alert holds and the rolling share. The earlier ones (at most this - 1) are classified in one batch before the
    # reply starts: 4 short ones took 1.5 s on one core of the stand-in, 7 took 2.5 s, so no more are read.
    wellbeing_lookback: int = max(AlertRule.window, AlertRule.trend_window)
    temperature_range: tuple[float, float] = (0.0, 1.5)  # slider bounds; the default comes from Settings
    max_tokens_range: tuple[int, int] = (16, 512)  # slider bounds, in new tokens


if __name__ == "__main__":  # for the Makefile: one line, space-separated
    print(DEFAULT_SOURCE, MODELS_DIR, DEFAULT_QUANT, DEFAULT_HOST, DEFAULT_PORT)
