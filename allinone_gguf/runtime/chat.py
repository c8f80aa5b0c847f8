"""The chat role's text side: the model's chat template, turns tokenized once, and the history window.

    >>> from allinone_gguf.runtime.chat import ChatTemplate
    >>> t = ChatTemplate(None)                      # no template in the GGUF: Qwen1.5's ChatML
    >>> t.render_text([("user", "hi")], generation=True)
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'

Contents are rendered as placeholders and their tokens spliced in, so only template text is parsed for special
tokens: a user who types "<|im_end|>" sends plain text. Qwen3's template has a thinking mode; it is rendered
with `enable_thinking=False` (the template then closes an empty <think></think> block itself), so the first
generated token is the answer; `ThinkFilter` keeps any <think>…</think> text from reaching a user.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no chat template: Qwen1.5's ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MARK = re.compile("\ue000(\\d+)\ue001")   # private-use characters stand in for message contents while rendering


def _raise(message: str):
    raise ValueError(f"chat template: {message}")


class ChatTemplate:
    """The model's Jinja chat template (or ChatML), rendered as Hugging Face's apply_chat_template does."""

    def __init__(self, source: str | None, thinking: bool = False):
        self.source = source or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self._template = env.from_string(self.source)
        self.has_thinking = "enable_thinking" in self.source
        self.thinking = thinking

    def render_text(self, messages: list[tuple[str, str]], generation: bool) -> str:
        return self._template.render(messages=[{"role": r, "content": c} for r, c in messages],
                                     add_generation_prompt=generation, enable_thinking=self.thinking,
                                     bos_token="", eos_token="<|endoftext|>")

    def render(self, turns: Sequence[tuple[str, list[int]]], generation: bool,
               tokenize_special: Callable[[str], list[int]], bos: list[int] = ()) -> tuple[list[int], list[int]]:
        """(token ids of `turns` = (role, content tokens), the index where each turn's content starts)."""
        text = self.render_text([(role, f"\ue000{i}\ue001") for i, (role, _) in enumerate(turns)], generation)
        parts = _MARK.split(text)
        tokens, starts = list(bos), [0] * len(turns)
        for j, part in enumerate(parts):
            if j % 2:
                starts[int(part)] = len(tokens)
                tokens += turns[int(part)][1]
            elif part:
                tokens += tokenize_special(part)
        return tokens, starts


@dataclass
class Turn:
    """One message of a conversation as the model saw it: `tokens` are exactly what was decoded for its content
    (a user turn's text plus its sentiment cue; an assistant turn's sampled token ids)."""

    role: str
    text: str
    tokens: list[int] = field(repr=False)


def same_text(a: str, b: str) -> bool:
    """Whether a client's copy of a message is the message we hold (clients may trim the whitespace)."""
    return a == b or a.strip() == b.strip()


def shared_turns(history: Sequence[tuple[str, str]], held: Sequence[Turn]) -> int:
    """How many leading (role, text) turns of a request's history are the turns a slot holds."""
    n = 0
    for (role, text), turn in zip(history, held):
        if role != turn.role or not same_text(text, turn.text):
            break
        n += 1
    return n


def window_start(starts: list[int], turns: Sequence[Turn], total: int, budget: int, start: int) -> int | None:
    """The first history turn to keep so that the prompt fits in `budget` tokens, chosen in one pass.

    `starts[i]` is where history turn i begins in the full prompt of `total` tokens (index len(turns) = the new
    user turn). `start` is the window the conversation used last time: it stays while the prompt fits, so the
    KV prefix is reused. When it does not fit, the window moves on to leave a quarter of the budget free, so the
    next turns fit again without re-decoding the whole window every turn. A window starts on a user turn.
    Returns None when even the new turn alone does not fit.
    """
    def size(k: int) -> int:
        return total - (starts[k] - starts[0])
    if start < len(turns) and size(start) <= budget and turns[start].role == "user":
        return start
    target = budget - budget // 4
    fallback = None
    for k in range(len(turns) + 1):
        if k < len(turns) and turns[k].role != "user":
            continue
        if size(k) <= target:
            return k
        if fallback is None and size(k) <= budget:
            fallback = k
    if fallback is not None:
        return fallback
    return None if size(len(turns)) > budget else len(turns)


class ThinkFilter:
    """Drops <think>…</think> blocks from a stream of text pieces, even when a tag is split across pieces."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self):
        self.inside, self.pending, self.closed = False, "", False   # closed: newlines after </think> are dropped

    def feed(self, piece: str) -> str:
        text, out = self.pending + piece, []
        self.pending = ""
        while text:
            if self.closed:
                text = text.lstrip("\n")
                self.closed = not text
                if not text:
                    break
            tag = self.CLOSE if self.inside else self.OPEN
            i = text.find(tag)
            if i >= 0:
                if not self.inside:
                    out.append(text[:i])
                text, self.inside = text[i + len(tag):], not self.inside
                self.closed = not self.inside
                continue
            keep = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)
            if not self.inside:
                out.append(text[:len(text) - keep])
            self.pending = text[len(text) - keep:]
            break
        return "".join(out)

    def flush(self) -> str:
        rest, self.pending = ("" if self.inside else self.pending), ""
        return rest
