"""One llama.cpp model and context whose KV cache holds several independent sequences, each remembering its tokens.

    >>> from allinone_gguf.runtime.backend import Backend
    >>> b = Backend("model.gguf", n_ctx=1024, n_threads=2, n_seq=2)           # doctest: +SKIP
    >>> row = b.prefill(1, b.tokenize("<|im_start|>user\\nhi", special=True))  # doctest: +SKIP
    >>> row.shape                                                              # doctest: +SKIP
    (151936,)

Why not `llama_cpp.Llama`: it decodes everything into sequence 0 and keeps only the longest common prefix with
the previous prompt, so two roles with different system prompts evict each other's cache on every switch. Here
each role owns a sequence id in one unified KV cache, and `prefill` decodes only the tokens after the longest
prefix that the sequence already holds. Only the last row of logits is requested (no `logits_all`), so the
logits buffer is one row of n_vocab floats instead of n_ctx rows.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import llama_cpp
import numpy as np

log = logging.getLogger(__name__)

# llama-cpp-python prints llama.cpp's log lines to stderr according to this logger's level. Its level table
# predates ggml's current enum (WARN now arrives as ERROR, ERROR as DEBUG), so only CRITICAL silences the load
# chatter; our own errors say what failed. Left alone when the application has set a level.
_LLAMA_LOGGER = logging.getLogger("llama-cpp-python")
_BACKEND_READY = threading.Lock()
_backend_initialised = False
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)  # llama_token_data


class ModelLoadError(RuntimeError):
    """The model file is missing or is not a loadable GGUF file."""


def _model_error(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}; run `make models` to build the GGUF files "
                          "(or pass the path of an existing .gguf file)")


def check_gguf(path: Path) -> None:
    """Raise ModelLoadError naming `path` unless it is an existing file that starts with the GGUF magic."""
    if not path.is_file():
        raise _model_error(path, "model file not found")
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise _model_error(path, "not a GGUF file (bad magic)")


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KVFull(RuntimeError):
    """llama_decode found no free KV cells for the batch (every cell is held by some sequence)."""


def _decode_failure(rc: int) -> str:
    """What a non-zero llama_decode status means."""
    return "no free KV cells (context full)" if rc == 1 else f"llama_decode returned {rc}"


class Backend:
    """A llama.cpp model + context with `n_seq` sequences in one unified KV cache of `n_ctx` cells."""

    def __init__(self, path: str | Path, *, n_ctx: int, n_threads: int, n_seq: int, n_batch: int = 512,
                 flash_attn: bool | None = None):
        global _backend_initialised
        self.path = Path(path)
        check_gguf(self.path)
        if _LLAMA_LOGGER.level == logging.NOTSET:
            _LLAMA_LOGGER.setLevel(logging.CRITICAL)
        with _BACKEND_READY:
            if not _backend_initialised:
                llama_cpp.llama_backend_init()
                _backend_initialised = True
        self.model = self.ctx = self.batch = None
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode("utf-8"), mparams)
        if not self.model:
            raise _model_error(self.path, "llama.cpp could not load this file (truncated or corrupt?)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True      # all sequences share the n_ctx cells instead of n_ctx / n_seq each
        cparams.no_perf = False        # keep llama.cpp's timings: perf() reports them
        if flash_attn is not None:     # None: llama.cpp's auto, which turns it on where the backend has it (CPU)
            cparams.flash_attn_type = int(flash_attn)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {self.path}")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.held: list[list[int]] = [[] for _ in range(n_seq)]   # tokens each sequence holds, position = index
        template = llama_cpp.llama_model_chat_template(self.model, None)
        self.chat_template = template.decode("utf-8") if template else None
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.adapter = None            # a LoRA (load_adapter), applied only to the batches decode() is told to
        self._adapter_on = False

    def load_adapter(self, path: str | Path) -> None:
        """Load a GGUF LoRA for this model; `decode(..., adapter=True)` applies it to one batch at a time."""
        adapter = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode("utf-8"))
        if not adapter:
            raise ModelLoadError(f"{path}: llama.cpp could not load this LoRA for {self.path.name} "
                                 "(another architecture or shape?)")
        self.adapter = adapter     # freed with the model

    def _use_adapter(self, on: bool) -> None:
        if on == self._adapter_on:
            return
        if on:
            if self.adapter is None:
                raise RuntimeError("no adapter loaded")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        else:
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not {'apply' if on else 'remove'} the LoRA adapter (rc {rc})")
        self._adapter_on = on

    # -- text <-> tokens ----------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; `special=True` parses markers such as <|im_start|> (never use it on user text)."""
        data = text.encode("utf-8", errors="replace")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            raise RuntimeError(f"tokenizer failed on a text of {len(data)} bytes")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character); special tokens render as their text."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def is_end(self, token: int) -> bool:
        """End of a reply: an end-of-generation token (<|im_end|>, <|endoftext|>) or any other control token
        (e.g. <|im_start|>, which would begin a new turn)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token) or llama_cpp.llama_vocab_is_control(self.vocab, token))

    # -- KV cache -----------------------------------------------------------------------------------------------
    def prefill(self, seq: int, tokens: list[int], reuse: int | None = None, adapter: bool = False) -> np.ndarray:
        """Make sequence `seq` hold exactly `tokens`; return the logits row after the last one (a view, n_vocab).

        Only the tokens after the longest prefix already held (at most `reuse` tokens) are decoded; the rest of
        the sequence is dropped. A fixed `reuse` makes the decoded batch, and so the float rounding of the
        result, the same on every call: llama.cpp's batched and single-token kernels round differently.
        `adapter`: decode with the loaded LoRA applied.
        """
        if not tokens:
            raise ValueError("prefill needs at least one token")
        keep = common_prefix(self.held[seq], tokens)
        keep = min(keep, len(tokens) - 1, len(tokens) if reuse is None else reuse)   # last token: its logits
        self.truncate(seq, keep)
        for start in range(keep, len(tokens), self.n_batch):
            self.decode([(seq, tokens[start:start + self.n_batch], start + self.n_batch >= len(tokens))], adapter)
        return self.last_logits()

    def decode(self, parts: list[tuple[int, list[int], bool]], adapter: bool = False) -> list[int | None]:
        """One llama_decode for several sequences at once (continuous batching): each part (seq, tokens, want)
        appends `tokens` to sequence `seq` after what it holds. Returns, per part, the batch index of its last
        token when `want` (read it with `logits_row` or a Sampler until the next decode), else None.
        `adapter`: the loaded LoRA is applied to this batch only (the KV cells it writes carry its effect).

        On failure nothing of this batch stays in the cache and RuntimeError says why.
        """
        total = sum(len(toks) for _, toks, _ in parts)
        if not parts or not all(toks for _, toks, _ in parts) or total > self.n_batch:
            raise ValueError(f"{len(parts)} parts of {total} tokens do not fit one batch of {self.n_batch} tokens")
        b, i, out = self.batch, 0, []
        for seq, toks, want in parts:
            pos0 = len(self.held[seq])
            for j, tok in enumerate(toks):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos0 + j, 1
                b.seq_id[i][0] = seq
                b.logits[i] = int(want and j == len(toks) - 1)
                i += 1
            out.append(i - 1 if want else None)
        b.n_tokens = i
        self._use_adapter(adapter)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            for seq, _, _ in parts:
                llama_cpp.llama_memory_seq_rm(self.memory, seq, len(self.held[seq]), -1)
            raise (KVFull if rc == 1 else RuntimeError)(
                f"decoding {len(parts)} sequences ({i} tokens) in one batch failed: {_decode_failure(rc)}")
        for seq, toks, _ in parts:
            self.held[seq].extend(toks)
        return out

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make sequence `dst` hold the first `n` tokens of `src`, sharing their cells (nothing is copied)."""
        if len(self.held[src]) < n:
            raise ValueError(f"sequence {src} holds {len(self.held[src])} tokens, fewer than {n}")
        self.forget(dst)
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, 0, n)
        self.held[dst] = list(self.held[src][:n])

    def perf(self) -> dict:
        """llama.cpp's own counters for this context: tokens it decoded (prompt batches and single tokens) and the
        milliseconds it spent; the proof of what a call really decoded."""
        data = llama_cpp.llama_perf_context(self.ctx)
        return {"prompt_tokens": int(data.n_p_eval), "single_tokens": int(data.n_eval),
                "decoded_tokens": int(data.n_p_eval) + int(data.n_eval),
                "prompt_ms": float(data.t_p_eval_ms), "single_ms": float(data.t_eval_ms)}

    def truncate(self, seq: int, n: int) -> None:
        """Keep only the first `n` tokens of sequence `seq`."""
        if n < len(self.held[seq]):
            llama_cpp.llama_memory_seq_rm(self.memory, seq, n, -1)
            del self.held[seq][n:]

    def forget(self, seq: int) -> None:
        """Drop everything sequence `seq` holds."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, 0, -1)
        self.held[seq].clear()

    def last_logits(self) -> np.ndarray:
        return self.logits_row(-1)

    def logits_row(self, i: int) -> np.ndarray:
        """The logits of the batch's i-th token (-1 = the last), a view of n_vocab floats into the context."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -- sampling -----------------------------------------------------------------------------------------------
    def grammar_first_tokens(self, grammar: str) -> list[int]:
        """Ids of every token the GBNF `grammar` allows as the first token of an answer."""
        smpl = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not smpl:
            raise ValueError(f"llama.cpp rejected the grammar {grammar!r}")
        try:
            data = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
            data["id"] = np.arange(self.n_vocab, dtype=np.intc)
            arr = llama_cpp.llama_token_data_array(
                data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False)
            llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
            return [int(i) for i in data["id"][np.isfinite(data["logit"])]]
        finally:
            llama_cpp.llama_sampler_free(smpl)

    def sampler(self, *, temperature: float, top_k: int, top_p: float, repeat_penalty: float,
                seed: int | None, grammar: str | None = None) -> "Sampler":
        return Sampler(self, temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty,
                       seed=seed, grammar=grammar)

    def logprobs(self, index: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """log P(token) under the model's own distribution at the batch's `index`-th row (before any sampling
        setting), and the `top` likeliest tokens with theirs, likeliest first."""
        row = self.logits_row(index).astype(np.float64)
        peak = row.max()
        norm = peak + np.log(np.exp(row - peak).sum())
        best = np.argpartition(-row, top)[:top] if 0 < top < len(row) else np.arange(len(row) if top else 0)
        best = best[np.argsort(-row[best], kind="stable")]
        return float(row[token] - norm), [(int(i), float(row[i] - norm)) for i in best]

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:   # interpreter shutdown: llama_cpp may already be gone
            pass


class Sampler:
    """A llama.cpp sampler chain for replies: [grammar ->] penalties -> top-k -> top-p -> temperature -> seeded
    draw. A GBNF `grammar` (structured outputs) lets through only tokens that keep the reply inside it."""

    def __init__(self, backend: Backend, *, temperature: float, top_k: int, top_p: float, repeat_penalty: float,
                 seed: int | None, grammar: str | None = None):
        self.backend = backend
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if grammar is not None:
            rule = llama_cpp.llama_sampler_init_grammar(backend.vocab, grammar.encode("utf-8"), b"root")
            if not rule:
                self.close()
                raise ValueError("llama.cpp rejected the reply's grammar (response_format)")
            add(rule)
        if repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(backend.n_vocab, 64, repeat_penalty, 0.0, 0.0))
        if temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(top_k))
            add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF))

    def sample(self, index: int = -1) -> int:
        """Draw the next token from the logits row of the last batch's `index`-th token (-1 = the last), and
        record it for the repetition penalty."""
        return int(llama_cpp.llama_sampler_sample(self.chain, self.backend.ctx, index))

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
