"""`AllInOne`: one GGUF model, two roles — grammar-forced sentiment with a confidence, then a streamed reply.

    >>> from allinone_gguf import AllInOne
    >>> bot = AllInOne("models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf", n_threads=2)  # doctest: +SKIP
    >>> s = bot.classify("今天的实验终于成功了，太棒了！")                                      # doctest: +SKIP
    >>> s.label, round(s.confidence, 2)                                                         # doctest: +SKIP
    ('正面', 0.97)
    >>> print("".join(bot.stream_reply("今天的实验终于成功了，太棒了！", sentiment=s)))         # doctest: +SKIP

Design (see README "Runtime"): both roles live in one llama.cpp context with a unified KV cache, owned by one
worker thread (scheduler.py). Sequence 0 holds the sentiment role's fixed prompt (system text and worked
examples); texts to classify are decoded in branch sequences that share those cells, so a classification costs
the tokens of the text, not of the prompt. Each chat conversation owns a slot sequence that keeps its window,
so its next turn decodes only the new turn. A text read before is answered from the sentiment cache (cache.py)
in the caller's thread, without the worker. This module turns requests into token work for that worker.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

from .adapter import AdapterError, AdapterInfo, check_base, file_sha256, find_adapter, frame_digest
from .backend import Backend, common_prefix
from .cache import SentimentCache, reader_identity, text_key
from .chat import ChatTemplate, Turn, shared_turns, window_start
from .config import Settings
from .prompts import CARE_SYSTEM, CHAT_SYSTEM, ELISION, LABEL_SETS, SENTIMENT_CUE, SENTIMENT_GRAMMAR
from .jobs import ClassifyJob, ContextOverflow, ReplyJob, ReplyStream
from .scheduler import Scheduler
from .sentiment import LabelReader, Sentiment, head_tail, language_of, sentiment_frame, sentiment_from_margin

log = logging.getLogger(__name__)

SEQ_SENTIMENT = 0
MAX_TOP_LOGPROBS = 20  # alternatives per token a reply may report (OpenAI's top_logprobs bound)
BRANCHES = 16          # texts classified in one batch, each in a branch sequence after SEQ_SENTIMENT


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")
    return text


def clip_chars(text: str, limit: int) -> str:
    """`text`, or its first and last characters, `limit` in all, when it is longer: far more than the sentiment
    role or the context reads of it, so the tokens they keep are the same, but tokenizing stays bounded."""
    if len(text) <= limit:
        return text
    return text[:limit // 2] + text[len(text) - (limit - limit // 2):]


def check_history(history: Sequence[dict] | None, max_chars: int | None = None) -> list[tuple[str, str]]:
    """(role, content) pairs from OpenAI/Gradio "messages"; roles user/assistant, string content."""
    out, size = [], 0
    for i, m in enumerate(history or ()):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise ValueError(f"history[{i}] must be {{'role': 'user' | 'assistant', 'content': str}}, got {m!r}")
        size += len(content)
        out.append((role, content))
    if max_chars is not None and size > max_chars:
        raise ValueError(f"the history holds {size} characters, more than the {max_chars} accepted "
                         "(max_history_chars); send only the recent turns")
    return out


class AllInOne:
    """One model, two roles, served by one worker thread. Thread-safe: call it from as many threads as you like."""

    backend_class = Backend     # tests put a fake here

    def __init__(self, model_path: str | Path, settings: Settings | None = None, **overrides):
        self.settings = s = (settings or Settings()).replace(**overrides)
        self.model_path = Path(model_path)
        # Answers for texts seen before (cache.py), looked up in the caller's thread; None when sentiment_cache=0.
        self._cache = SentimentCache(s.sentiment_cache) if s.sentiment_cache else None
        self._worker = Scheduler(self._load, sentiment_seq=SEQ_SENTIMENT, branch_seqs=range(1, 1 + BRANCHES),
                                 slot_seqs=range(1 + BRANCHES, 1 + BRANCHES + s.parallel), max_queue=s.max_queue,
                                 queue_timeout=s.queue_timeout)

    def _load(self):
        """The backend with both roles' fixed prompts prepared; runs on the worker thread."""
        s = self.settings
        adapter = find_adapter(self.model_path, s.sentiment_adapter)
        if adapter is not None:
            check_base(adapter, self.model_path)
        b = self.backend_class(self.model_path, n_ctx=s.n_ctx, n_threads=s.n_threads,
                               n_seq=1 + BRANCHES + s.parallel)
        try:
            self._template = ChatTemplate(b.chat_template, thinking=s.thinking)
            tok = b.tokenize
            self._elision = tok(ELISION)
            self._readers = {lang: LabelReader(b.grammar_first_tokens(SENTIMENT_GRAMMAR[lang]), b.piece, lang)
                             for lang in LABEL_SETS}
            # The adapter's label language is read in the frame it was trained in; the other in the settings'.
            self._frames = {lang: sentiment_frame(adapter.prompt if adapter and adapter.labels == lang
                                                  else s.sentiment_prompt, lang, tok,
                                                  lambda turns, generation: self._render(b, turns, generation)[0])
                            for lang in LABEL_SETS}
            self._adapter: AdapterInfo | None = adapter
            if adapter is not None:
                if adapter.labels not in LABEL_SETS or frame_digest(
                        *self._frames[adapter.labels], self._readers[adapter.labels].ids) != adapter.frame_sha256:
                    raise AdapterError(f"sentiment adapter {adapter.path.name} was trained on another prompt frame "
                                       f"than this version's {adapter.prompt!r} ({adapter.labels}) frame; tune it "
                                       "again or pass --sentiment-adapter off")
                b.load_adapter(adapter.path)
            if s.sentiment_cache:
                self._readers_id = self._reader_identities(adapter)
            self._system = {lang: tok(CHAT_SYSTEM[lang]) for lang in LABEL_SETS}
            longest_after = max(len(z) for _, z in self._frames.values())
            if s.sentiment_tokens + longest_after > b.n_batch - s.parallel:
                raise ValueError(f"sentiment_tokens={s.sentiment_tokens} plus the prompt's closing "
                                 f"{longest_after} tokens must fit one batch of {b.n_batch - s.parallel} tokens; "
                                 f"lower sentiment_tokens")
            reserve = max(len(a) + len(z) for a, z in self._frames.values()) + s.sentiment_tokens
            self.chat_budget = b.n_ctx - reserve
            if self.chat_budget < 64 + min(s.max_tokens, 64):
                raise ValueError(f"n_ctx={s.n_ctx} leaves {self.chat_budget} tokens for the chat after the "
                                 f"sentiment role's {reserve}; raise n_ctx or lower sentiment_tokens")
            # Warm the fixed prefixes, so the first calls are as fast as the rest: the sentiment frame, and the
            # chat's system prompt in the first slot (a new conversation shares it).
            b.prefill(SEQ_SENTIMENT, self._frames[self._read_frame(s.labels)][0], adapter=adapter is not None)
            b.prefill(1 + BRANCHES, self._render(b, [("system", self._system[s.labels])], False)[0])
        except BaseException:
            b.close()
            raise
        return b

    def _reader_identities(self, adapter: AdapterInfo | None) -> dict[str, str]:
        """{label language: reader_identity}: the second half of every sentiment cache key (cache.py)."""
        s, out = self.settings, {}
        held = "none" if adapter is None else f"{file_sha256(adapter.path)} temperature {adapter.temperature!r}"
        for lang in LABEL_SETS:
            frame = adapter.labels if adapter is not None else lang       # _read_frame, before _adapter is set
            digest = frame_digest(*self._frames[frame], self._readers[frame].ids)
            out[lang] = reader_identity(lang, LABEL_SETS[lang], digest, held, s.sentiment_bias, s.sentiment_tokens)
        return out

    def _read_frame(self, lang: str) -> str:
        """The label language whose frame reads a text: the adapter's (one adapter serves both label sets: it
        was trained on Chinese and English texts in its own frame), else the one asked for."""
        return self._adapter.labels if self._adapter is not None else lang

    # -- public API ---------------------------------------------------------------------------------------------
    def label_set(self, labels: str | None = None) -> tuple[str, str]:
        """(positive, negative) labels for a label language ("zh" / "en"; None = settings.labels)."""
        return LABEL_SETS[language_of(labels, self.settings.labels)]

    def classify(self, text: str, labels: str | None = None) -> Sentiment:
        """The sentiment of `text`, forced by the grammar to one label."""
        return self.classify_many([text], labels)[0]

    def classify_many(self, texts: Sequence[str], labels: str | None = None) -> list[Sentiment]:
        """classify() of each text, decoded several at a time (each in a sequence sharing the cached prompt).

        Texts are packed into batches of at most BRANCHES texts that need no more KV cells than one long text
        does; running replies go on between two batches. Labels and confidences match classify()'s up to float
        rounding (a batch of several texts sums in another order).
        """
        texts = [clip_chars(check_text(t), self.settings.max_text_chars) for t in texts]
        if not texts:
            return []
        lang = language_of(labels, self.settings.labels)
        cache = self._cache
        if cache is None:
            return self._worker.submit(self._classify_job(texts, lang)).wait()
        # Texts read before are answered here, in the caller's thread; the others are decoded once each.
        found, todo = cache.lookup([(text_key(t), self._readers_id[lang]) for t in texts])
        if todo:
            job = self._classify_job([texts[where[0]] for where in todo.values()], lang, list(todo))
            for where, answer in zip(todo.values(), self._worker.submit(job).wait()):
                for i in where:
                    found[i] = answer
        return [dataclasses.replace(a, probs=dict(a.probs)) for a in found]    # a caller cannot edit the cache's

    def _classify_job(self, texts: list[str], lang: str, keys: list | None = None) -> ClassifyJob:
        """The worker's job for classify_many (texts already checked). With a sentiment adapter every text is read
        in the frame it was trained in, whatever the label language (the label's name follows `lang`). With
        `keys` (one per text) the answers go into the sentiment cache as soon as the last is read."""
        frame = self._read_frame(lang)
        before, after = self._frames[frame]
        reader, s = self._readers[frame], self.settings
        room = s.sentiment_tokens + len(after)
        adapter = self._adapter is not None
        scale, source = (1.0 / self._adapter.temperature, "adapter") if adapter else (1.0, "grammar")

        def plan(b):    # the groups, each tokenized when the worker reaches it
            group: list[tuple[int, list[int]]] = []
            for i, t in enumerate(texts):
                body = self._body(b, t, frame)
                if group and (len(group) == BRANCHES or sum(len(x) for _, x in group) + len(body) > room):
                    yield group
                    group = []
                group.append((i, body))
            yield group

        def prefix(b) -> int:
            # The sentiment sequence must start with this language's frame, decoded whole as at start-up when it
            # did not (another language was used last): the same batches give the same floats.
            if b.held[SEQ_SENTIMENT][:len(before)] != before:
                b.forget(SEQ_SENTIMENT)
                b.prefill(SEQ_SENTIMENT, before, adapter=adapter)
            b.truncate(SEQ_SENTIMENT, len(before))
            return len(before)

        def read(b, row: int) -> Sentiment:
            margin = reader.margin(b.logits_row(row)) * scale + s.sentiment_bias
            return sentiment_from_margin(margin, LABEL_SETS[lang], source)

        cache = self._cache
        on_done = None if keys is None or cache is None else lambda found: cache.put_many(zip(keys, found))
        return ClassifyJob(plan, prefix, read, len(texts), adapter, on_done)

    @property
    def sentiment_adapter(self) -> AdapterInfo | None:
        """The sentiment LoRA in use (file, label language, temperature, its metadata), or None."""
        return self._worker.call(lambda b: self._adapter)

    def sentiment_inputs(self, texts: Sequence[str], labels: str | None = None
                         ) -> tuple[list[list[int]], tuple[list[int], list[int]], str]:
        """What the sentiment role decodes for each text (the whole frame: prompt, text cut to sentiment_tokens,
        the turn's close), the token ids it reads each label's probability from, and the frame's digest: the
        exact inputs a sentiment adapter is trained on (allinone_gguf/tune)."""
        texts = [clip_chars(check_text(t), self.settings.max_text_chars) for t in texts]
        lang = language_of(labels, self.settings.labels)

        def build(b):
            before = self._frames[lang][0]
            return ([before + self._body(b, t, lang) for t in texts], self._readers[lang].ids,
                    frame_digest(*self._frames[lang], self._readers[lang].ids))
        return self._worker.call(build)

    def _body(self, b, text: str, lang: str) -> list[int]:
        """A text's tokens after the sentiment frame's fixed prefix: the text (head and tail when too long), then
        the frame's close."""
        return head_tail(b.tokenize(text), self.settings.sentiment_tokens, self._elision) + self._frames[lang][1]

    def stream_reply(self, text: str, history: Sequence[dict] | None = None, sentiment: Sentiment | None = None,
                     temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None,
                     **options) -> ReplyStream:
        """Reply to `text` after `history` (oldest first, without `text`); iterate the result for text pieces.

        `sentiment` (from classify) reaches the model as a cue on the user turn; None = no cue. Keyword options:
        `top_p`; `stop` (strings that end the reply, not sent); `conversation` names the KV slot to prefer (any
        id the caller keeps; without it the slot sharing the longest history is used); a text too long for the
        context is shortened (head and tail) unless `shorten=False`, which raises ContextOverflow (from
        wait_started() or the first next()); `grammar` (GBNF, e.g. json_grammar(schema)) constrains the reply;
        `logprobs=k` records each sampled token's log probability and its k likeliest alternatives
        (ReplyStream.logprobs()); `care=True` puts a system turn right before the user's that asks the reply to
        check in gently (prompts.CARE_SYSTEM, which names no label; the app sets it while its wellbeing alert
        holds), and `care` may be a function of the message's Sentiment (None without one) that decides it.
        care=False (the default) leaves the prompt token for token as without it. Pieces never split a UTF-8
        character.
        """
        return self._reply(text, history, sentiment, None, temperature, max_tokens, seed, **options)

    def _reply(self, text, history, sentiment: Sentiment | None, label_job: ClassifyJob | None, temperature,
               max_tokens, seed, *, top_p: float | None = None, stop: Sequence[str] = (),
               conversation: str | None = None, shorten: bool = True, grammar: str | None = None,
               logprobs: int | None = None, labels: str | None = None,
               care: bool | Callable[[Sentiment | None], bool] = False) -> ReplyStream:
        """stream_reply, with either a known `sentiment` or a `label_job` (respond) whose label is not read yet."""
        text = check_text(text)
        s = self.settings
        if len(text) > s.max_text_chars and not shorten:
            raise ValueError(f"the message holds {len(text)} characters, more than the {s.max_text_chars} accepted "
                             "(max_text_chars); shorten it")
        read = clip_chars(text, s.max_text_chars)       # what is tokenized; the turn keeps the text as sent
        turns = check_history(history, s.max_history_chars)
        temperature = s.temperature if temperature is None else float(temperature)
        top_p = s.top_p if top_p is None else float(top_p)
        max_tokens = s.max_tokens if max_tokens is None else int(max_tokens)
        if temperature < 0 or max_tokens < 1 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0, max_tokens >= 1 and top_p in (0, 1], got "
                             f"{temperature}, {max_tokens}, {top_p}")
        stops = [x for x in stop if x]
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {logprobs}")
        max_tokens = min(max_tokens, self.chat_budget // 2)
        budget = self.chat_budget - max_tokens
        # Each variant of the prompt: the cue after the user's text, and whether the check-in turn comes before it.
        if label_job is not None:       # respond(): the prompt before the cue may be decoded before the label
            lang = labels
            cares = (False, True) if callable(care) else (bool(care),)    # a function decides once the label is in
            cues = {(positive, c): (SENTIMENT_CUE[lang][0 if positive else 1], c)
                    for positive in (True, False) for c in cares}
        else:
            lang, cue = s.labels, ""
            if sentiment is not None:
                lang = next((k for k, v in LABEL_SETS.items() if sentiment.label in v), lang)
                cue = SENTIMENT_CUE[lang][0 if sentiment.is_positive else 1]
            cues = {None: (cue, bool(care(sentiment)) if callable(care) else bool(care))}

        def care_after(sentiment) -> bool:
            """respond's `care` once the label is read, on the worker thread: a failing function is logged, and the
            reply goes on without the check-in rather than taking the worker down."""
            if not callable(care):
                return bool(care)
            try:
                return bool(care(sentiment))
            except Exception:
                log.exception("care(sentiment) failed; the reply goes on without the check-in note")
                return False

        def variant(b, past, body, cue_tokens, care_tokens, hint):
            """(prompt, the turns it holds, window start) with this cue and check-in turn (None: none); shortened or
            refused when too long. The check-in is not one of the turns: the next request's prompt goes without it,
            so only this turn's prompt carries it."""
            prompt, start = self._window(b, lang, past, body + cue_tokens, budget, hint, care_tokens)
            if prompt is None:
                need = len(self._window(b, lang, [], body + cue_tokens, 10 ** 9, 0, care_tokens)[0])
                room = len(body) - (need - budget)
                if not shorten or room < 8:
                    raise ContextOverflow(need, max_tokens, self.chat_budget)
                body = head_tail(body, room, self._elision)
                prompt, start = self._window(b, lang, [], body + cue_tokens, budget, 0, care_tokens)
                past = []
            return prompt, past + [Turn("user", text, body + cue_tokens)], start

        def prepare(b, slot):
            matched = shared_turns(turns, slot.turns)
            past = slot.turns[:matched] + [Turn(role, content, b.tokenize(content))   # held: the tokens the
                                           for role, content in turns[matched:]]     # model saw (cue, sampled ids)
            body, hint = b.tokenize(read), slot.start if 0 < slot.start <= matched else 0
            care_tokens = b.tokenize(CARE_SYSTEM[lang])
            variants = {key: variant(b, past, body, b.tokenize(cue), care_tokens if c else None, hint)
                        for key, (cue, c) in cues.items()}
            sampler = b.sampler(temperature=temperature, top_k=s.top_k, top_p=top_p,
                                repeat_penalty=s.repeat_penalty, seed=s.seed if seed is None else seed,
                                grammar=grammar)
            if label_job is None:
                return (*variants[None], sampler, None)
            # All variants share everything before the cue (before the check-in turn when the label decides it):
            # decode that now, the rest once the label is in.
            prompt, new_turns, start = variants[True, cares[0]]
            split = min(common_prefix(prompt, other[0]) for other in variants.values())

            def later(sentiment):
                prompt, new_turns, start = variants[sentiment.is_positive, care_after(sentiment)]
                return prompt[split:], new_turns, start
            return prompt[:split], new_turns[:-1], start, sampler, later

        job = ReplyJob(prepare, turns, conversation, max_tokens, hide_thinking=True, stop=stops, logprobs=logprobs,
                       sentiment=sentiment, label_job=label_job)
        self._worker.submit(job)
        return ReplyStream(job)

    def respond(self, text: str, history: Sequence[dict] | None = None, labels: str | None = None,
                temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None,
                **options) -> ReplyStream:
        """A message's whole job: the sentiment of `text`, then a reply that knows it. The two overlap: while
        other replies stream, the reply's prompt up to the user's text is decoded in the same batch as the text's
        sentiment frame and the cue (a few tokens) rides with the next; with nothing else running, the frame goes
        first and the whole prompt, cue included, right after it (scheduler._step). `stream.sentiment()` returns the label (it
        is there before the first piece); the options are stream_reply's. A text in the sentiment cache is
        stream_reply with its cached label: the same prompt and cue, without decoding its sentiment frame."""
        text = check_text(text)
        lang = language_of(labels, self.settings.labels)
        read, cache, keys = clip_chars(text, self.settings.max_text_chars), self._cache, None
        if cache is not None:
            keys = [(text_key(read), self._readers_id[lang])]
            (known,), _ = cache.lookup(keys)
            if known is not None:
                known = dataclasses.replace(known, probs=dict(known.probs))
                return self._reply(text, history, known, None, temperature, max_tokens, seed, **options)
        label_job = self._classify_job([read], lang, keys)
        self._worker.submit(label_job)
        try:
            return self._reply(text, history, None, label_job, temperature, max_tokens, seed, labels=lang, **options)
        except BaseException:
            label_job.cancel()
            raise

    def reply(self, text: str, history: Sequence[dict] | None = None, sentiment: Sentiment | None = None,
              temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None,
              **options) -> str:
        """The whole reply (the joined stream_reply)."""
        with self.stream_reply(text, history, sentiment, temperature, max_tokens, seed, **options) as stream:
            return "".join(stream)

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is for this model."""
        return len(self._worker.call(lambda b: b.tokenize(text)))

    def stats(self) -> dict:
        """Counters for measurement: llama.cpp's own (decoded_tokens, prompt_tokens, single_tokens, prompt_ms,
        single_ms, since load), the worker's batches and queue, and the sentiment cache's (sentiment_cache_hits:
        texts answered without decoding, _misses: texts decoded, _entries, _capacity, _evictions; 0 when off)."""
        perf = self._worker.call(lambda b: b.perf())
        cache = self._cache.stats() if self._cache is not None else dict.fromkeys(
            ("hits", "misses", "entries", "capacity", "evictions"), 0)
        return {**perf, "batches": self._worker.steps, **self._worker.load,
                **{"sentiment_cache_" + k: v for k, v in cache.items()}}

    @property
    def load(self) -> dict:
        """What the worker has now: requests waiting, replies streaming, slots (no trip through the queue)."""
        return self._worker.load

    @property
    def n_ctx(self) -> int:
        return self._worker.backend.n_ctx

    def close(self) -> None:
        """Cancel what runs and waits, and free the model; later calls raise RuntimeError."""
        self._cache = None          # nothing is answered from it any more: a closed model answers nothing
        self._worker.close()

    def __enter__(self) -> "AllInOne":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- chat prompt --------------------------------------------------------------------------------------------
    def _render(self, b, turns, generation: bool) -> tuple[list[int], list[int]]:
        """(tokens, where each turn's content starts) of `turns` through the chat template."""
        return self._template.render(turns, generation, lambda t: b.tokenize(t, True), [b.bos] if b.add_bos else [])

    def _window(self, b, lang: str, past: list[Turn], user: list[int], budget: int, start: int,
                care: list[int] | None = None):
        """(prompt tokens, first history turn kept) for the newest turns that fit `budget`; (None, None) when
        the new turn alone does not fit. Two renders whatever the history's length. `care`: a system turn's
        content put right before the new user turn (it counts as part of the new turn)."""
        turns = [("system", self._system[lang]), *((t.role, t.tokens) for t in past),
                 *([("system", care)] if care is not None else []), ("user", user)]
        tokens, starts = self._render(b, turns, True)
        k = window_start(starts[1:], past, len(tokens), budget, start)
        if k is None:
            return None, None
        if k:
            tokens, _ = self._render(b, [turns[0], *turns[1 + k:]], True)
        return tokens, k
