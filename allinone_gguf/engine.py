"""`AllInOne`: one GGUF model, two roles — grammar-forced sentiment with a confidence, then a streamed reply.

    >>> from allinone_gguf import AllInOne
    >>> bot = AllInOne("models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf", n_threads=2)  # doctest: +SKIP
    >>> s = bot.classify("今天的实验终于成功了，太棒了！")                                      # doctest: +SKIP
    >>> s.label, round(s.confidence, 2)                                                         # doctest: +SKIP
    ('正面', 0.97)
    >>> print("".join(bot.stream_reply("今天的实验终于成功了，太棒了！", sentiment=s)))         # doctest: +SKIP

Design (see README "Runtime"): both roles live in one llama.cpp context with a unified KV cache. Sequence 1
holds the sentiment role's fixed prompt (system text and worked examples); sequence 0 holds the chat
(system text, history, last reply). Each call decodes only what follows the prefix a sequence already holds,
so a classification costs the tokens of the text, not of the prompt, and the next reply reuses the history.
The label is read from the same forward pass: the probabilities of the tokens the GBNF grammar allows first,
summed per label and renormalised over the labels.
"""
from __future__ import annotations

import codecs
import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .backend import Backend
from .config import Settings
from .prompts import CHAT_SYSTEM, ELISION, LABEL_SETS, SENTIMENT_CUE, SENTIMENT_GRAMMAR, SENTIMENT_PROMPTS

log = logging.getLogger(__name__)

SEQ_CHAT, SEQ_SENTIMENT = 0, 1
BRANCHES = 16          # classify_many: texts decoded together, each in a sequence after these two
# Used when a GGUF carries no chat template: Qwen1.5's ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MARK = re.compile("\ue000(\\d+)\ue001")   # private-use characters stand in for message contents while rendering
_CUE_MEMORY = 256                            # user turns whose cue is remembered for later renders of the history


@dataclass(frozen=True)
class Sentiment:
    """The sentiment role's answer. `probs` holds both labels (positive first) and sums to 1."""

    label: str
    confidence: float
    probs: dict[str, float]
    labels: tuple[str, str]

    @property
    def is_negative(self) -> bool:
        return self.label == self.labels[1]

    @property
    def is_positive(self) -> bool:
        return self.label == self.labels[0]


def head_tail(tokens: Sequence[int], budget: int, marker: Sequence[int] = ()) -> list[int]:
    """`tokens` if they fit in `budget`, else their head and tail around `marker` in exactly `budget` tokens."""
    if len(tokens) <= budget:
        return list(tokens)
    room = budget - len(marker)
    if room < 2:
        return list(tokens[:budget])
    head = room // 2            # the tail gets the odd token: reviews tend to conclude at the end
    return list(tokens[:head]) + list(marker) + list(tokens[len(tokens) - (room - head):])


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")
    return text


def check_history(history: Sequence[dict] | None) -> list[tuple[str, str]]:
    """(role, content) pairs from OpenAI/Gradio "messages"; roles user/assistant, string content."""
    out = []
    for i, m in enumerate(history or ()):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise ValueError(f"history[{i}] must be {{'role': 'user' | 'assistant', 'content': str}}, got {m!r}")
        out.append((role, content))
    return out


def language_of(labels: str | None, default: str) -> str:
    lang = default if labels is None else labels
    if lang not in LABEL_SETS:
        raise ValueError(f"labels must be one of {tuple(LABEL_SETS)}, not {labels!r}")
    return lang


class _LabelReader:
    """Which first tokens the grammar allows, and which label each one begins."""

    def __init__(self, backend: Backend, lang: str):
        self.labels = LABEL_SETS[lang]
        self.ids: tuple[list[int], list[int]] = ([], [])
        for tok in backend.grammar_first_tokens(SENTIMENT_GRAMMAR[lang]):
            piece = backend.piece(tok)
            owners = [k for k, label in enumerate(self.labels) if label.encode("utf-8").startswith(piece)]
            if len(owners) != 1:
                raise RuntimeError(f"grammar token {piece!r} does not begin exactly one of {self.labels}")
            self.ids[owners[0]].append(tok)
        if not all(self.ids):
            raise RuntimeError(f"the grammar allows no first token for one of {self.labels}")

    def margin(self, logits) -> float:
        """log P(positive) - log P(negative) under the grammar, from one row of logits."""
        def logsumexp(ids):
            xs = [float(logits[i]) for i in ids]
            m = max(xs)
            return m + math.log(sum(math.exp(x - m) for x in xs))
        return logsumexp(self.ids[0]) - logsumexp(self.ids[1])


class AllInOne:
    """One model, two roles. Thread-safe: one lock around the model, held by a running stream_reply."""

    backend_class = Backend     # tests put a fake here

    def __init__(self, model_path: str | Path, settings: Settings | None = None, **overrides):
        self.settings = (settings or Settings()).replace(**overrides)
        self.model_path = Path(model_path)
        s = self.settings
        self._lock = threading.Lock()
        self._closing = threading.Event()    # tells a running stream to stop so close() gets the lock
        self._backend = self.backend_class(self.model_path, n_ctx=s.n_ctx, n_threads=s.n_threads,
                                             n_seq=2 + BRANCHES)
        b = self._backend
        self._formats = {gen: Jinja2ChatFormatter(template=b.chat_template or CHATML_TEMPLATE, eos_token="<|endoftext|>",
                                                  bos_token="", add_generation_prompt=gen) for gen in (True, False)}
        self._elision = b.tokenize(ELISION)
        self._readers: dict[str, _LabelReader] = {}
        self._cues: OrderedDict[str, str] = OrderedDict()
        # The sentiment role's prompt around the text, per label language: (tokens before, tokens after).
        self._frames = {lang: self._sentiment_frame(lang) for lang in LABEL_SETS}
        reserve = max(len(a) + len(z) for a, z in self._frames.values()) + s.sentiment_tokens
        self.chat_budget = b.n_ctx - reserve
        if self.chat_budget < 64 + min(s.max_tokens, 64):
            b.close()
            raise ValueError(f"n_ctx={s.n_ctx} leaves {self.chat_budget} tokens for the chat after the sentiment "
                             f"role's {reserve}; raise n_ctx or lower sentiment_tokens")
        with self._lock:     # warm both fixed prefixes once, so the first calls are as fast as the rest
            b.prefill(SEQ_SENTIMENT, self._frames[s.labels][0])
            b.prefill(SEQ_CHAT, self._render([("system", b.tokenize(CHAT_SYSTEM[s.labels]))], generation=False))
            self._reader(s.labels)

    # -- public API ---------------------------------------------------------------------------------------------
    def label_set(self, labels: str | None = None) -> tuple[str, str]:
        """(positive, negative) labels for a label language ("zh" / "en"; None = settings.labels)."""
        return LABEL_SETS[language_of(labels, self.settings.labels)]

    def classify(self, text: str, labels: str | None = None) -> Sentiment:
        """The sentiment of `text`, forced by the grammar to one label; the same text always gets the same label."""
        text = check_text(text)
        self._check_open()
        lang = language_of(labels, self.settings.labels)
        before, after = self._frames[lang]
        body = head_tail(self._backend.tokenize(text), self.settings.sentiment_tokens, self._elision)
        with self._lock:
            self._check_open()
            self._hold_frame(before)
            logits = self._backend.prefill(SEQ_SENTIMENT, before + body + after, reuse=len(before))
            margin = self._reader(lang).margin(logits) + self.settings.sentiment_bias
        return self._sentiment(margin, LABEL_SETS[lang])

    def classify_many(self, texts: Sequence[str], labels: str | None = None) -> list[Sentiment]:
        """classify() of each text, decoded several at a time: faster per text for files of short messages.

        Texts are packed into batches that need no more KV cells than one long text does, each text in its own
        sequence sharing the cached sentiment prompt. Labels and confidences are classify()'s up to float
        rounding (batched kernels sum in another order); a text whose two labels are within that rounding can
        come out differently. The model is locked per batch, so chat turns can run in between.
        """
        texts = [check_text(t) for t in texts]
        self._check_open()
        lang = language_of(labels, self.settings.labels)
        before, after = self._frames[lang]
        b = self._backend
        bodies = [head_tail(b.tokenize(t), self.settings.sentiment_tokens, self._elision) + after for t in texts]
        room = min(b.n_batch, self.settings.sentiment_tokens + len(after))   # the cells one classify() may use
        groups: list[list[list[int]]] = []
        for body in bodies:
            if not groups or len(groups[-1]) == BRANCHES or sum(map(len, groups[-1])) + len(body) > room:
                groups.append([])
            groups[-1].append(body)
        out: list[Sentiment] = []
        for group in groups:
            with self._lock:
                self._check_open()
                self._hold_frame(before)
                b.truncate(SEQ_SENTIMENT, len(before))                # free the last text's cells for the batch
                rows = b.prefill_branches(SEQ_SENTIMENT, len(before), group, first_seq=SEQ_SENTIMENT + 1)
                margins = [self._reader(lang).margin(r) + self.settings.sentiment_bias for r in rows]
            out += [self._sentiment(m, LABEL_SETS[lang]) for m in margins]
        return out

    def stream_reply(self, text: str, history: Sequence[dict] | None = None, sentiment: Sentiment | None = None,
                     temperature: float | None = None, max_tokens: int | None = None,
                     seed: int | None = None) -> Iterator[str]:
        """Reply to `text` after `history` (oldest first, without `text`), piece by piece.

        `sentiment` (from classify) reaches the model as a cue on the user turn; None = no cue. Pieces never
        split a UTF-8 character. The model is locked from the first piece until the generator finishes, is
        closed, or is dropped.
        """
        text = check_text(text)
        self._check_open()
        turns = check_history(history)
        s = self.settings
        temperature = s.temperature if temperature is None else float(temperature)
        max_tokens = s.max_tokens if max_tokens is None else int(max_tokens)
        if temperature < 0 or max_tokens < 1:
            raise ValueError(f"temperature must be >= 0 and max_tokens >= 1, got {temperature}, {max_tokens}")
        lang = s.labels
        cue = ""
        if sentiment is not None:
            lang = next((k for k, v in LABEL_SETS.items() if sentiment.label in v), lang)
            cue = SENTIMENT_CUE[lang].format(label=sentiment.label)
        max_tokens = min(max_tokens, self.chat_budget // 2)
        prompt = self._chat_prompt(text, cue, turns, lang, self.chat_budget - max_tokens)
        if cue:
            self._remember_cue(text, cue)
        return self._generate(prompt, temperature, max_tokens, s.seed if seed is None else seed)

    def reply(self, text: str, history: Sequence[dict] | None = None, sentiment: Sentiment | None = None,
              temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None) -> str:
        """The whole reply (the joined stream_reply)."""
        return "".join(self.stream_reply(text, history, sentiment, temperature, max_tokens, seed))

    def close(self) -> None:
        """Free the model. A running stream stops at its next token; later calls raise RuntimeError."""
        self._closing.set()
        with self._lock:
            self._backend.close()

    def __enter__(self) -> "AllInOne":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise RuntimeError(f"this AllInOne ({self.model_path.name}) is closed")

    # -- sentiment role -----------------------------------------------------------------------------------------
    def _sentiment_frame(self, lang: str) -> tuple[list[int], list[int]]:
        """Tokens of the sentiment prompt before and after the text to judge."""
        p = SENTIMENT_PROMPTS[self.settings.sentiment_prompt]
        tok = self._backend.tokenize
        turns = [("system", tok(p.system[lang]))]
        for text, k in p.shots:
            turns += [("user", tok(p.user.format(text=text))), ("assistant", tok(LABEL_SETS[lang][k]))]
        pre, post = p.user.split("{text}")
        turns.append(("user", [-1]))     # -1 marks where the text goes
        tokens = self._render(turns, generation=True)
        cut = tokens.index(-1)
        return tokens[:cut] + tok(pre), tok(post) + tokens[cut + 1:]

    def _hold_frame(self, before: list[int]) -> None:
        """Make the sentiment sequence start with `before`, decoded whole as at start-up when it did not (another
        label language was used last): the same batches give the same floats, so a text's answer never depends
        on what was classified before it."""
        b = self._backend
        if b.held[SEQ_SENTIMENT][:len(before)] != before:
            b.forget(SEQ_SENTIMENT)
            b.prefill(SEQ_SENTIMENT, before)

    def _reader(self, lang: str) -> _LabelReader:
        if lang not in self._readers:
            self._readers[lang] = _LabelReader(self._backend, lang)
        return self._readers[lang]

    @staticmethod
    def _sentiment(margin: float, labels: tuple[str, str]) -> Sentiment:
        p_pos = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, margin))))
        label = labels[0] if margin > 0 else labels[1]
        probs = {labels[0]: p_pos, labels[1]: 1.0 - p_pos}
        return Sentiment(label=label, confidence=probs[label], probs=probs, labels=labels)

    # -- chat role ----------------------------------------------------------------------------------------------
    def _render(self, turns: list[tuple[str, list[int]]], generation: bool) -> list[int]:
        """Token ids of `turns` ((role, content tokens)) through the model's chat template.

        The template is rendered with placeholders for the contents, so only template text is parsed for special
        tokens; user text containing "<|im_end|>" stays plain text.
        """
        marked = [{"role": role, "content": f"\ue000{i}\ue001"} for i, (role, _) in enumerate(turns)]
        text = self._formats[generation](messages=marked).prompt
        parts = _MARK.split(text)
        tokens = [self._backend.bos] if self._backend.add_bos else []
        for j, part in enumerate(parts):
            if j % 2:
                tokens += turns[int(part)][1]
            elif part:
                tokens += self._backend.tokenize(part, special=True)
        return tokens

    def _chat_prompt(self, text: str, cue: str, turns: list[tuple[str, str]], lang: str, budget: int) -> list[int]:
        """The chat prompt in at most `budget` tokens: oldest history dropped first, then the text shortened."""
        tok = self._backend.tokenize
        cache: dict[str, list[int]] = {}

        def content(role: str, c: str) -> list[int]:
            if c not in cache:
                cache[c] = tok(c)
            if role == "user" and c in self._cues:     # the same tokens the turn was sent with: text, then cue
                return cache[c] + tok(self._cues[c])
            return cache[c]

        system = ("system", tok(CHAT_SYSTEM[lang]))
        body, cue_tokens = tok(text), tok(cue)
        while True:
            past = [(role, content(role, c)) for role, c in turns]
            tokens = self._render([system, *past, ("user", body + cue_tokens)], generation=True)
            if len(tokens) <= budget:
                return tokens
            if turns:
                turns = turns[1:]
                while turns and turns[0][0] != "user":   # a conversation restarts on a user turn
                    turns = turns[1:]
                continue
            room = len(body) - (len(tokens) - budget)
            if room < 8:
                raise ValueError(f"the chat prompt does not fit in {budget} tokens; raise n_ctx")
            body = head_tail(body, room, self._elision)

    def _remember_cue(self, text: str, cue: str) -> None:
        self._cues[text] = cue
        self._cues.move_to_end(text)
        while len(self._cues) > _CUE_MEMORY:
            self._cues.popitem(last=False)

    def _generate(self, prompt: list[int], temperature: float, max_tokens: int, seed: int | None) -> Iterator[str]:
        s = self.settings
        with self._lock:
            self._check_open()
            b = self._backend
            tokens = list(prompt)     # what this stream has put in the chat sequence
            b.prefill(SEQ_CHAT, tokens)
            sampler = b.sampler(temperature=temperature, top_k=s.top_k, top_p=s.top_p,
                                repeat_penalty=s.repeat_penalty, seed=seed)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                for step in range(max_tokens):
                    if self._closing.is_set():
                        break
                    if step:
                        b.prefill(SEQ_CHAT, tokens)   # decodes just the last token (the sequence is ours)
                    token = sampler.sample()
                    if b.is_end(token):
                        break
                    tokens.append(token)
                    piece = decoder.decode(b.piece(token))
                    if piece:
                        yield piece
                # bytes of a character cut off by max_tokens stay in the decoder: never a broken character
            finally:
                sampler.close()
