"""Pure helpers for the Gradio app (app.py): badge text, chat <-> history, mood chart data, model list.

Nothing here imports gradio or touches a model, so it is tested without a browser:

    >>> from allinone_gguf.faces.ui_helpers import badge
    >>> badge("正面", 0.93, negative=False)
    '😄 LLM 情感判断: 正面 (置信度 93%)'

The app's defaults (AppSettings, the default model, host and port) live in faces/defaults.py.
"""
from __future__ import annotations

import html
import ipaddress
import re
from pathlib import Path
from typing import Any, Iterable


# Badge wording per label language; the Chinese form is the seeds' `😄 LLM 情感判断: 正面`.
BADGE_WORDS = {"zh": ("LLM 情感判断", "置信度"), "en": ("LLM sentiment", "confidence")}
BADGE_EMOJI = {False: "😄", True: "😢"}  # keyed by "is negative"
# The first line of an assistant message when it starts with a badge (either language).
BADGE_RE = re.compile(r"^(😄|😢) LLM (情感判断|sentiment): [^\n]*(\n\n?|$)")
LANGUAGE_CHOICES = [("中文", "zh"), ("English", "en")]
MOOD_COLORS = {True: "#2e9d57", False: "#d64545"}  # keyed by "mood >= 0"


TUNED_WORD = {"zh": "微调", "en": "tuned"}      # the badge's mark for a label from the sentiment adapter


def badge(label: str, confidence: float, negative: bool, lang: str = "zh", source: str = "grammar") -> str:
    """`😄 LLM 情感判断: 正面 (置信度 93%)`; lang "en" gives `... LLM sentiment: Positive (confidence 93%)`.
    A label from the sentiment adapter (tune) says so: `(置信度 93%, 微调)` / `(confidence 93%, tuned)`."""
    head, conf = BADGE_WORDS.get(lang, BADGE_WORDS["zh"])
    tuned = f", {TUNED_WORD.get(lang, TUNED_WORD['zh'])}" if source == "adapter" else ""
    return f"{BADGE_EMOJI[bool(negative)]} {head}: {label} ({conf} {confidence:.0%}{tuned})"


# The wellbeing note shown above the chat while the watch's alert holds (faces/care.py), and its dismiss button, per
# label language. It speaks to the person, not about a detector: no label, no score.
NOTE_WORDS = {
    "zh": ("最近几轮（第 {turns} 轮）你的心情似乎一直不太好。", "想聊聊的话，我一直都在；如果觉得难以承受，请联系身边"
           "信任的人，或拨打当地的心理援助热线。", "、", "知道了"),
    "en": ("Your last few messages (turns {turns}) sound like things have been hard for a while.", "I'm here if you "
           "want to talk; if it feels like too much, please reach out to someone you trust or a local helpline.",
           ", ", "Dismiss"),
}


def wellbeing_note(turns: Iterable[int], lang: str = "zh") -> tuple[str, str]:
    """(the note's HTML, the dismiss button's text) for an alert fired by these turns (the mood chart's numbers).

        >>> wellbeing_note([2, 3, 5], "en")[1]
        'Dismiss'
    """
    head, rest, sep, button = NOTE_WORDS.get(lang, NOTE_WORDS["zh"])
    head = html.escape(head.format(turns=sep.join(str(t) for t in turns)))
    return (f'<div class="wellbeing-note" role="status" style="padding:10px 14px;border-radius:8px;'
            f'background:#fff4e0;border:1px solid #f0b45a;color:#5a3a00">💛 <b>{head}</b> {html.escape(rest)}</div>',
            button)


def assistant_text(badge_line: str, reply: str) -> str:
    """What the chat shows for one assistant turn: the badge, a blank line, the (partial) reply."""
    return f"{badge_line}\n\n{reply}" if reply else badge_line


def content_text(content: Any) -> str:
    """Plain text of one chat message's content, whether a str or Gradio 6's [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return ""


def history_from_chat(messages: Iterable[dict] | None) -> list[dict]:
    """Runtime history (role/content strings, oldest first) from the chat as displayed.

    Badges are display only, so they are removed from assistant turns; turns left empty (a reply stopped
    before its first piece) are dropped; system messages and other roles are ignored.
    """
    history = []
    for message in messages or []:
        role = message.get("role")
        text = content_text(message.get("content"))
        if role == "assistant":
            text = BADGE_RE.sub("", text, count=1)
        if role in ("user", "assistant") and text.strip():
            history.append({"role": role, "content": text})
    return history


def mood_point(turn: int, label: str, probs: dict[str, float], positive: str) -> dict:
    """One row of the mood chart: mood = P(positive) - P(negative), in [-1, 1]; above 0 reads as positive."""
    p_pos = float(probs.get(positive, 0.0))
    return {"turn": int(turn), "mood": round(2.0 * p_pos - 1.0, 4), "label": label}


def mood_svg(points: Iterable[dict], width: int = 360, height: int = 150, last: int = 24) -> str:
    """A small self-contained SVG bar chart of the last `last` turns' mood (needs no script and no network).

    Bars grow up (green) for positive turns and down (red) for negative ones; each bar carries
    class="mood-bar", data-turn and data-label, and a tooltip with the numbers.
    """
    points = list(points)[-last:]
    mid, half, left, step = height / 2, height / 2 - 18, 28, (width - 36) / max(len(points), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="mood-chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="mood per turn">',
             f'<line x1="{left}" y1="{mid}" x2="{width - 4}" y2="{mid}" stroke="#999" stroke-width="1"/>',
             f'<text x="2" y="{mid - half + 4}" font-size="10" fill="#666">+1</text>',
             f'<text x="8" y="{mid + 4}" font-size="10" fill="#666">0</text>',
             f'<text x="2" y="{mid + half + 4}" font-size="10" fill="#666">−1</text>']
    if not points:
        parts.append(f'<text x="{width / 2}" y="{mid - 8}" font-size="12" fill="#888" text-anchor="middle">'
                     "no turns yet / 还没有对话</text>")
    for i, p in enumerate(points):
        mood = max(-1.0, min(1.0, float(p["mood"])))
        x, h = left + i * step + step * 0.15, max(abs(mood) * half, 1.0)
        y, color = (mid - h, MOOD_COLORS[True]) if mood >= 0 else (mid, MOOD_COLORS[False])
        label = html.escape(str(p["label"]))
        parts.append(f'<rect class="mood-bar" data-turn="{p["turn"]}" data-label="{label}" x="{x:.1f}" y="{y:.1f}" '
                     f'width="{step * 0.7:.1f}" height="{h:.1f}" fill="{color}"><title>turn {p["turn"]}: {label} '
                     f'(mood {mood:+.2f})</title></rect>')
        if len(points) <= 12 or i % 2 == 0:
            parts.append(f'<text x="{x + step * 0.35:.1f}" y="{height - 2}" font-size="10" fill="#666" '
                         f'text-anchor="middle">{p["turn"]}</text>')
    return "".join(parts) + "</svg>"


def list_models(models_dir: Path, extra: Iterable[Path] = ()) -> list[tuple[str, str]]:
    """(shown name, absolute path) for every *.gguf under models_dir, sorted, plus the `extra` files given."""
    root = Path(models_dir).resolve()
    found = sorted(root.rglob("*.gguf")) if root.is_dir() else []
    for path in extra:
        path = Path(path).resolve()
        if path.is_file() and path not in found:
            found.append(path)
    return [(model_name(path, root), str(path)) for path in found]


def model_name(path: Path, models_dir: Path) -> str:
    """Path relative to the models folder when inside it, else the file name."""
    path, root = Path(path).resolve(), Path(models_dir).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`, the only hosts the app binds to without a warning."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

