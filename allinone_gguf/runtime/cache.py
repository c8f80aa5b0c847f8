"""The sentiment cache: answers for texts seen before, the least recently used dropped first.

    >>> from allinone_gguf.runtime.cache import SentimentCache
    >>> cache = SentimentCache(2)
    >>> cache.put_many([("a", 1), ("b", 2), ("c", 3)])          # "a" is dropped: two entries fit
    >>> cache.lookup(["a", "c", "c"])                            # "a" once to decode; "c" twice, both hits
    ([None, 3, 3], {'a': [0]})
    >>> {k: v for k, v in cache.stats().items() if k in ("hits", "misses", "entries")}
    {'hits': 2, 'misses': 1, 'entries': 2}

`AllInOne` keeps one when `Settings.sentiment_cache` > 0 (its size in entries): `classify`, `classify_many` and
`respond` answer a text they have read before from here, in the caller's thread, without a trip through the
worker's queue or a single llama_decode. A key is (`text_key` of the text as the sentiment role reads it,
`reader_identity` of everything else that decides the answer); see docs/cache.md.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Hashable, Iterable


def text_key(text: str) -> bytes:
    """sha256 of a text (already clipped to max_text_chars, as the engine tokenizes it): 32 bytes per entry
    whatever the text's length. surrogatepass: a lone surrogate is text a caller may send, and reaches the model."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def reader_identity(lang: str, labels: tuple[str, str], frame_sha256: str, adapter: str, bias: float,
                    sentiment_tokens: int) -> str:
    """A digest of everything besides the text that decides a sentiment: the label language and its names, the
    prompt frame's token ids (adapter.frame_digest of the frame the text is read in), the sentiment adapter
    (`adapter`: its file's sha256 and temperature, or "none"), sentiment_bias and sentiment_tokens (where a long
    text is cut). The model's weights are not in it: a cache belongs to one loaded model."""
    parts = {"labels": [lang, *labels], "frame": frame_sha256, "adapter": adapter, "bias": float(bias).hex(),
             "sentiment_tokens": int(sentiment_tokens)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


class SentimentCache:
    """A bounded LRU map, safe to use from any thread (one lock, held for dictionary work only). `hits` counts
    texts answered without being decoded, a repeat inside one request included; `misses` the distinct texts
    that had to be decoded."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a sentiment cache holds at least 1 entry, not {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def lookup(self, keys: list[Hashable]) -> tuple[list[Any], dict[Hashable, list[int]]]:
        """(the cached answer or None per key, {key: positions} of the keys to decode, each once)."""
        found, todo = [], {}
        with self._lock:
            for i, key in enumerate(keys):
                value = self._entries.get(key)
                if value is None:
                    todo.setdefault(key, []).append(i)
                else:
                    self._entries.move_to_end(key)
                found.append(value)
            self.misses += len(todo)
            self.hits += len(keys) - len(todo)
        return found, todo

    def put_many(self, items: Iterable[tuple[Hashable, Any]]) -> None:
        with self._lock:
            for key, value in items:
                self._entries[key] = value
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                    "capacity": self.capacity, "evictions": self.evictions}
