"""What a request is while the worker serves it (llama-server's server-task.h): the job types, their errors, and
the stream a caller reads a reply from.

    >>> from allinone_gguf.runtime.jobs import ContextOverflow
    >>> str(ContextOverflow(900, 128, 1000)).startswith("the prompt needs 900 tokens")
    True

A job is made on the caller's thread and handed to the worker (scheduler.py); the worker fills it in and the
caller waits on its event or reads its channel. Every job can be cancelled from any thread.
"""
from __future__ import annotations

import codecs
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .chat import ThinkFilter

class QueueFull(RuntimeError):
    """Too many requests are waiting; try again later (HTTP 503 with Retry-After)."""


class ContextOverflow(ValueError):
    """A prompt that does not fit the context even with no history (HTTP 400 with the token counts)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        super().__init__(f"the prompt needs {prompt_tokens} tokens plus up to {max_tokens} new tokens, more than the "
                         f"{limit} tokens a conversation may use; shorten the message or lower max_tokens")
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit


class Closed(RuntimeError):
    """The model was closed."""


_END = object()   # closes a stream's channel


class Job:
    """One request. `cancel()` may be called from any thread; the worker stops the job at its next step."""

    _ids = itertools.count(1)

    def __init__(self):
        self.id = next(self._ids)
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancelled.set()

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError


class CallJob(Job):
    """Run `fn(backend)` on the worker (tokenizing, reading counters, the sentiment groups' set-up)."""

    def __init__(self, fn: Callable[[Any], Any]):
        super().__init__()
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Groups:
    """A classification's groups, made one at a time when the worker needs the next (tokenizing as it goes): a
    large request never holds the worker longer than one group's tokenizing."""

    def __init__(self, groups: Iterator[list[tuple[int, list[int]]]]):
        self._source, self._ready = iter(groups), deque()

    def peek(self) -> list[tuple[int, list[int]]] | None:
        if not self._ready:
            group = next(self._source, None)
            if group is not None:
                self._ready.append(group)
        return self._ready[0] if self._ready else None

    def pop(self) -> list[tuple[int, list[int]]]:
        self.peek()
        return self._ready.popleft()

    def put_back(self, group: list[tuple[int, list[int]]]) -> None:
        self._ready.appendleft(group)

    def __bool__(self) -> bool:
        return self.peek() is not None


class ClassifyJob(CallJob):
    """Texts to classify, decoded a group per step; `plan(backend)` yields the groups, each a list of
    (index, tokens after the shared prefix), made when the worker reaches them; `read(backend, logits row)` is
    called per text. With `adapter` the groups never share a batch with replies: the LoRA must touch the
    sentiment sequences only. `on_done(results)` runs on the worker when the last text is read, before any caller
    sees the results (the engine fills its sentiment cache there)."""

    def __init__(self, plan: Callable[[Any], Iterator[list[tuple[int, list[int]]]]], prefix: Callable[[Any], int],
                 read: Callable[[Any], Any], n: int, adapter: bool = False,
                 on_done: Callable[[list[Any]], None] | None = None):
        super().__init__(plan)
        self.prefix, self.read, self.on_done = prefix, read, on_done
        self.adapter = adapter      # decode the groups with the sentiment LoRA, in batches of their own
        self.groups: Groups | None = None
        self.results: list[Any] = [None] * n

    def finish(self) -> None:
        """Every text is read: hand the results over."""
        if self.on_done is not None:
            self.on_done(self.results)
        self.result = self.results
        self.done.set()


class ReplyJob(Job):
    """The worker's side of a streamed reply (the caller holds a ReplyStream over it).

    `prepare(backend, slot)` runs on the worker and returns (prompt tokens, the turns now held, window start,
    sampler, later); the worker then decodes the prompt after the prefix the slot already holds, samples, and
    puts each piece on the channel. After the end, `usage` and `finish_reason` are set. With a `label_job`
    (AllInOne.respond) the prompt is the part both labels' cues share, and `later(label)` gives the rest, decoded
    as soon as the label job's one text is read: the label and the reply's prefill overlap.
    """

    def __init__(self, prepare: Callable, history: list[tuple[str, str]], conversation: str | None,
                 max_tokens: int, hide_thinking: bool, stop: list[str] = (), logprobs: int | None = None,
                 sentiment: Any = None, label_job: ClassifyJob | None = None):
        super().__init__()
        self.prepare, self.history, self.conversation = prepare, history, conversation
        self.sentiment = sentiment        # the label the reply was given, or
        self.label_job = label_job        # the classification whose label it waits for (respond)
        self.later: Callable | None = None  # label -> (the prompt's rest, turns, window start), while it waits
        self.max_tokens = max_tokens
        self.logprobs = logprobs          # None: none; k: each sampled token's log P and the k likeliest
        self.token_logprobs: list[TokenLogprob] = []
        self.channel: queue.Queue = queue.Queue()
        self.started = threading.Event()
        self.finish_reason: str | None = None
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        self.error: BaseException | None = None
        self._filter = ThinkFilter() if hide_thinking else None
        self.stop, self._held_back = list(stop), ""
        # worker-side state
        self.slot = None                 # the scheduler's Slot (its KV sequence) while it runs
        self.deferred = False            # its prompt waits for cells that running replies will free
        self.pending: list[int] = []     # prompt tokens still to decode, or the one sampled token to decode next
        self.sampled: list[int] = []
        self.sampler = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text: list[str] = []

    # worker side ----------------------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.finish_reason = self.finish_reason or "error"
        self.started.set()
        self.channel.put(_END)

    def emit(self, piece_bytes: bytes) -> bool:
        """Send the text of one sampled token; True when it completed a stop string (which is not sent)."""
        piece = self.decoder.decode(piece_bytes)
        if self._filter is not None:
            piece = self._filter.feed(piece)
        if self.stop:
            text = self._held_back + piece
            hits = [i for i in (text.find(x) for x in self.stop) if i >= 0]
            if hits:
                self._held_back = ""
                self._send(text[:min(hits)])
                return True
            # keep back what may be the start of a stop string until the next piece decides
            keep = max((k for x in self.stop for k in range(min(len(x) - 1, len(text)), 0, -1)
                        if text.endswith(x[:k])), default=0)
            self._held_back = text[len(text) - keep:] if keep else ""
            piece = text[:len(text) - keep]
        self._send(piece)
        return False

    def _send(self, piece: str) -> None:
        if piece:
            self.text.append(piece)
            self.channel.put(piece)

    def end(self, reason: str) -> None:
        self.finish_reason = reason
        # bytes of a character cut off by max_tokens stay in the decoder: never a broken character
        if reason != "stop" or not self.stop:
            self._send(self._held_back)
        if self._filter is not None:
            self._send(self._filter.flush())
        self.usage["completion_tokens"] = len(self.sampled)
        self.started.set()
        self.channel.put(_END)


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token of a reply: its bytes, log P under the model, and the likeliest alternatives
    ((bytes, log P), likeliest first) when they were asked for."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


class ReplyStream:
    """What `AllInOne.stream_reply` returns: iterate it for text pieces (never a broken UTF-8 character).

    `close()` (or leaving a `with` block, or dropping the object) cancels the reply; the worker frees its slot at
    the next step. After the end: `finish_reason` ("stop", "length", "cancelled") and `usage` (prompt_tokens,
    completion_tokens, cached_tokens = prompt tokens that were already in the slot and not decoded again).
    """

    def __init__(self, job: ReplyJob):
        self._job, self._done = job, False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        item = self._job.channel.get()
        if item is _END:
            self._done = True
            if self._job.error is not None:
                raise self._job.error
            raise StopIteration
        return item

    def sentiment(self, timeout: float | None = None):
        """The sentiment this reply knows: the one it was given, or (AllInOne.respond) its text's, as soon as it
        is read (before the first piece). Raises what the classification raised."""
        job = self._job.label_job
        if job is None:
            return self._job.sentiment
        if not job.done.wait(timeout):
            raise TimeoutError("the sentiment is not read yet")
        if job.error is not None:
            raise job.error
        return job.result[0]

    def wait_started(self, timeout: float | None = None) -> None:
        """Block until the prompt is accepted, or raise why it was refused (e.g. ContextOverflow, QueueFull)."""
        self._job.started.wait(timeout)
        if self._job.error is not None:
            raise self._job.error

    @property
    def finish_reason(self) -> str | None:
        return self._job.finish_reason

    @property
    def usage(self) -> dict:
        return dict(self._job.usage)

    def logprobs(self, start: int = 0) -> list[TokenLogprob]:
        """The sampled tokens' log probabilities from `start` on (with `logprobs=` on stream_reply; else []).
        Each token's entry is there before the text it completes is read from the stream."""
        return self._job.token_logprobs[start:]

    def cancel(self) -> None:
        """Stop the reply from any thread; a reader still gets what was sent, then the end."""
        self._job.cancel()

    def close(self) -> None:
        """Stop the reply and stop reading it."""
        self._done = True
        self._job.cancel()

    def __enter__(self) -> "ReplyStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:      # an abandoned stream must not keep generating
        self._job.cancel()
