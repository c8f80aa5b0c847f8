"""The serving core: one worker thread owns the llama.cpp context; requests reach it through a bounded queue.

    >>> from allinone_gguf.runtime.scheduler import Scheduler          # used through AllInOne, not directly

Like llama-server: every chat reply runs in a KV *slot* (one sequence of the unified cache, `parallel` of them,
reused least-recently-used), and all running replies decode their next token in one `llama_decode` batch
together with the next chunk of a new reply's prompt and a group of texts to classify (continuous batching).
A slot holds exactly the tokens that were decoded — cue and sampled tokens included — and remembers the turns
behind them, so a returning conversation (by id, or by the longest shared history, as a stateless OpenAI
client sends it) decodes only its new turn whatever other users did in between.

Nothing here holds a lock while a caller consumes a stream: pieces go to a per-request channel, every request
has a cancellation handle, and `close()` cancels what runs and returns promptly. The jobs and the streams
callers read are in jobs.py (llama-server: server-task.h); here are the queue (`submit`, `_admit`, as
server-queue.h) and the worker loop (`_run`, `_step`, as server-context.cpp).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .backend import KVFull, common_prefix
from .chat import Turn, shared_turns
from .jobs import CallJob, ClassifyJob, Closed, Groups, Job, QueueFull, ReplyJob, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """A KV sequence that holds one conversation's window."""

    seq: int
    conversation: str | None = None
    turns: list[Turn] = field(default_factory=list)   # the whole history as the model saw it
    start: int = 0                                    # first history turn inside the window
    last_used: float = 0.0
    busy: bool = False


class Scheduler:
    """The worker thread and its queue. The worker makes the backend with `load()` and is the only thread that
    ever calls llama.cpp, from load to close: llama.cpp's OpenMP threads belong to the thread that calls it, and
    calls from a second Python thread made every decode about 35 % slower on 2 cores (two thread teams)."""

    def __init__(self, load: Callable[[], Any], *, sentiment_seq: int, branch_seqs: range, slot_seqs: range,
                 max_queue: int, queue_timeout: float):
        self.backend = None
        self.sentiment_seq, self.branch_seqs = sentiment_seq, branch_seqs
        self.slots = [Slot(seq=seq) for seq in slot_seqs]
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._classify: deque[ClassifyJob] = deque()
        self._streams: list[ReplyJob] = []
        self._closing = False
        self.steps = 0                        # llama_decode calls made by the worker (for the bench)
        self._ready, self._load_error = threading.Event(), None
        self._thread = threading.Thread(target=self._run, args=(load,), name="allinone-worker", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error

    # caller side ----------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closing:
                raise Closed("the model is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model; try again soon")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(backend) on the worker and return its result (raises what it raised)."""
        return self.submit(CallJob(fn)).wait()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every waiting and running request, stop the worker and free the model."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def load(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "streams": len(self._streams),
                    "slots": len(self.slots), "max_queue": self.max_queue}

    # worker side ----------------------------------------------------------------------------------------------
    def _run(self, load: Callable[[], Any]) -> None:
        try:
            self.backend = load()
        except BaseException as exc:
            self._load_error = exc
            self._closing = True
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                with self._cond:
                    while not (self._closing or self._waiting or self._classify or self._streams):
                        self._cond.wait()
                    if self._closing:
                        break
                    admitted = self._admit()
                for job in admitted:
                    self._start(job)
                self._step()
        except BaseException as exc:     # a bug in the worker: fail everything rather than hang the callers
            log.exception("the model worker stopped")
            self._fail_all(RuntimeError(f"the model worker stopped: {exc}"))
        finally:
            with self._cond:
                self._closing = True
            self._fail_all(Closed("the model is closed"))
            self.backend.close()

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            jobs = list(self._waiting) + list(self._classify) + list(self._streams)
            self._waiting.clear()
            self._classify.clear()
            self._streams.clear()
        for job in jobs:
            self._release(job)
            if isinstance(job, ReplyJob) and job.started.is_set() and isinstance(exc, Closed):
                job.end("cancelled")        # a running reply just ends when the model closes
            else:
                job.fail(exc)

    def _admit(self) -> list[Job]:
        """Jobs that can start now, in order: calls and classifications always, replies while a slot is free.
        Waiting jobs that were cancelled or waited too long leave the queue. Called with the lock held."""
        out, keep, free = [], deque(), sum(not s.busy for s in self.slots)
        now = time.monotonic()
        for job in self._waiting:
            if job.cancelled.is_set():
                job.fail(Closed("cancelled before it started"))
            elif now - job.submitted > self.queue_timeout:
                job.fail(QueueFull(f"waited {self.queue_timeout:.0f} s for the model; try again soon"))
            elif isinstance(job, ReplyJob):
                if free:
                    free -= 1
                    out.append(job)
                else:
                    keep.append(job)
            else:
                out.append(job)
        self._waiting = keep
        return out

    def _start(self, job: Job) -> None:
        b = self.backend
        try:
            if isinstance(job, ClassifyJob):
                job.groups = Groups(job.fn(b))
                self._classify.append(job)
            elif isinstance(job, CallJob):
                job.result = job.fn(b)
                job.done.set()
            else:
                self._start_reply(job)
        except Exception as exc:
            self._release(job)
            job.fail(exc)

    def _choose_slot(self, job: ReplyJob) -> Slot:
        """The free slot whose turns share the longest history with the request (then: the conversation's own
        slot, then an empty one, then the least recently used)."""
        free = [s for s in self.slots if not s.busy]
        return max(free, key=lambda s: (shared_turns(job.history, s.turns),
                                        job.conversation is not None and s.conversation == job.conversation,
                                        not s.turns, -s.last_used))

    def _start_reply(self, job: ReplyJob) -> None:
        b = self.backend
        slot = self._choose_slot(job)
        slot.busy, slot.last_used, slot.conversation, job.slot = True, time.monotonic(), job.conversation, slot
        prompt, turns, start, job.sampler, job.later = job.prepare(b, slot)
        # the prompt's last token is decoded for its logits (unless the rest comes after the label)
        limit = len(prompt) - (job.later is None)
        keep = min(common_prefix(b.held[slot.seq], prompt), limit)
        # A longer prefix another slot holds (the system prompt, a shared history) is shared, not decoded again:
        # llama.cpp's seq_cp gives this sequence the same cells, as the sentiment branches share their frame.
        donor = max((s for s in self.slots if s is not slot), default=None,
                    key=lambda s: common_prefix(b.held[s.seq], prompt))
        shared = min(common_prefix(b.held[donor.seq], prompt), limit) if donor is not None else 0
        if shared > keep:
            b.copy_prefix(donor.seq, slot.seq, shared)
            keep = shared
        else:
            b.truncate(slot.seq, keep)
        slot.turns, slot.start = turns, start
        job.pending = prompt[keep:]
        job.usage.update(prompt_tokens=len(prompt), cached_tokens=keep)
        job.started.set()
        self._streams.append(job)
        self._take_label(job)

    def _take_label(self, job: ReplyJob) -> None:
        """Once the label a reply waits for is read: the rest of its prompt (the cue and the turn's close)."""
        label = job.label_job
        if job.later is None or not label.done.is_set():
            return
        if label.error is not None:
            self._drop(job, label.error)
            return
        rest, turns, start = job.later(label.result[0])
        job.later = None
        job.slot.turns, job.slot.start = turns, start
        job.pending = job.pending + rest
        job.usage["prompt_tokens"] += len(rest)

    def _release(self, job: Job) -> None:
        if isinstance(job, ReplyJob):
            if job.slot is not None:
                if job.sampled:    # the reply as far as it went is part of the conversation
                    job.slot.turns = job.slot.turns + [Turn("assistant", "".join(job.text), list(job.sampled))]
                job.slot.busy, job.slot.last_used = False, time.monotonic()
                job.slot = None
            if job.sampler is not None:
                job.sampler.close()
                job.sampler = None

    def _finish(self, job: ReplyJob, reason: str) -> None:
        self._release(job)
        with self._cond:
            if job in self._streams:
                self._streams.remove(job)
            for other in self._streams:      # cells were freed: prompts that waited for them go on
                other.deferred = False
        job.end(reason)

    def _step(self) -> None:
        """One llama_decode: the next token of every running reply, one group of texts to classify, and as much
        of new replies' prompts as still fits the batch.

        The texts go first, in a decode of their own, when the sentiment LoRA is on (it must touch them only), and
        when a reply waits for their label while no other reply streams: the label is then read sooner, and the
        reply's prompt follows in one decode with its cue, instead of a decode of the prompt and then a small one
        of the cue (a decode has a fixed price: worth paying when nobody else waits on it; with replies streaming,
        the cue rides along with their next tokens instead)."""
        b = self.backend
        for job in [j for j in self._streams if j.cancelled.is_set()]:
            self._finish(job, "cancelled")
        for job in [j for j in self._classify if j.cancelled.is_set()]:
            self._classify.remove(job)
            job.fail(Closed("cancelled"))
        for job in [j for j in self._streams if j.later is not None]:
            self._take_label(job)
        generating = [j for j in self._streams if j.sampled and j.pending]
        free = b.n_batch - sum(len(j.pending) for j in generating)     # the batch's room beside their next tokens
        parts, owners, room = [], [], free
        group_job, group = self._next_group(room)
        if group_job is not None:
            try:
                n_prefix = group_job.prefix(b)
            except KVFull:
                group_job.groups.put_back(group)
                group_job = group = None
                self._make_room([])
            else:
                for k, (index, toks) in enumerate(group):
                    seq = self.branch_seqs[k]
                    b.copy_prefix(self.sentiment_seq, seq, n_prefix)
                    parts.append((seq, toks, True))
                    owners.append(("text", (group_job, index)))
                    room -= len(toks)
        if group_job is not None and (group_job.adapter or not generating and any(
                j.label_job is group_job and j.later is not None for j in self._streams)):
            self._decode(parts, owners, group_job, group, group_job.adapter)
            for job in [j for j in self._streams if j.later is not None]:
                self._take_label(job)
            parts, owners, group_job, group, room = [], [], None, None, free
        for job in generating:
            parts.append((job.slot.seq, job.pending, True))
            owners.append(("reply", job))
        for job in [j for j in self._streams if not j.sampled and j.pending and not j.deferred]:
            if room <= 0:
                break
            chunk = job.pending[:room]
            parts.append((job.slot.seq, chunk, len(chunk) == len(job.pending) and job.later is None))
            owners.append(("prompt", job))
            room -= len(chunk)
        if parts:
            self._decode(parts, owners, group_job, group, False)

    def _next_group(self, room: int) -> tuple[ClassifyJob | None, list | None]:
        """The next group of texts to decode and its job, when it fits `room` tokens. Classifications take turns,
        a group each: a one-text request (a chat message's label) never waits behind a large file's. While a
        reply waits for its first token (its prompt, its label or the cue after it), a large classification's
        groups (hundreds of tokens a step) sit out, so that reply's few decodes stay small; they resume as soon as
        it streams."""
        urgent = any(not j.sampled for j in self._streams)
        for _ in range(len(self._classify)):
            job = self._classify[0]
            try:
                group = job.groups.peek()
            except Exception as exc:        # tokenizing one of its texts failed
                self._classify.popleft()
                job.fail(exc)
                continue
            self._classify.rotate(-1)           # the next step starts from the next classification
            unfit = group is None or sum(len(t) for _, t in group) > room
            if unfit or (urgent and len(job.results) > len(self.branch_seqs)):
                continue
            return job, job.groups.pop()
        return None, None

    def _decode(self, parts: list, owners: list, group_job: ClassifyJob | None, group, adapter: bool) -> None:
        """Decode one batch and hand each row to its owner (a reply's sampler, a text's reader)."""
        b = self.backend
        try:
            rows = b.decode(parts, adapter)
        except KVFull:
            if group_job is not None:
                group_job.groups.put_back(group)       # tried again at the next step
            self._make_room(owners)
            return
        except RuntimeError as exc:
            for kind, owner in owners:
                if kind in ("reply", "prompt"):
                    self._drop(owner, exc)
            if group_job is not None:
                self._classify.remove(group_job)
                group_job.fail(exc)
            return
        finally:
            self.steps += 1
            for k in range(sum(kind == "text" for kind, _ in owners)):
                b.forget(self.branch_seqs[k])
        for (kind, owner), (seq, toks, want), row in zip(owners, parts, rows):
            if kind == "text":
                job, index = owner
                job.results[index] = job.read(b, row)
            elif kind == "prompt" and not want:
                owner.pending = owner.pending[len(toks):]
            else:
                self._sample(owner, row)
        if group_job is not None and not group_job.groups:
            self._classify.remove(group_job)
            group_job.finish()

    def _drop(self, job: ReplyJob, exc: BaseException) -> None:
        self._release(job)
        with self._cond:
            if job in self._streams:
                self._streams.remove(job)
        job.fail(exc)

    def _make_room(self, owners: list) -> None:
        """The unified cache is full. Conversations share its cells without a fixed share each, so first the
        least recently used idle slot gives its cells back (its conversation is rebuilt from the history when it
        returns); else new prompts wait until running replies end; else the newest reply gives way."""
        b = self.backend
        idle = [s for s in self.slots if not s.busy and b.held[s.seq]]
        if idle:
            slot = min(idle, key=lambda s: s.last_used)
            b.forget(slot.seq)
            slot.turns, slot.start, slot.conversation = [], 0, None
            log.info("KV cache full: slot %d evicted", slot.seq)
            return
        running = [j for j in self._streams if j.sampled]
        prompts = [o for k, o in owners if k == "prompt"]
        if prompts and running:
            for job in prompts:
                job.deferred = True
            return
        victims = [o for k, o in owners if k in ("reply", "prompt")]
        if victims:
            self._drop(max(victims, key=lambda j: j.id),
                       RuntimeError("the context is full with other conversations' replies; try again shortly"))
        elif self._classify:
            self._classify.popleft().fail(RuntimeError("the context is full; raise n_ctx"))

    def _sample(self, job: ReplyJob, row: int) -> None:
        b = self.backend
        token = job.sampler.sample(row)
        if b.is_end(token):
            job.pending = []
            self._finish(job, "stop")
            return
        piece = b.piece(token)
        if job.logprobs is not None:      # recorded before the piece reaches the channel (ReplyStream.logprobs)
            logprob, top = b.logprobs(row, token, job.logprobs)
            job.token_logprobs.append(TokenLogprob(piece, logprob, tuple((b.piece(i), lp) for i, lp in top)))
        job.sampled.append(token)
        if job.emit(piece):
            job.pending = []
            self._finish(job, "stop")
        elif len(job.sampled) >= job.max_tokens:
            job.pending = []
            self._finish(job, "length")
        else:
            job.pending = [token]
