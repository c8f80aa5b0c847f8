"""Structured outputs: a JSON Schema (or "any JSON object") as the GBNF grammar a reply is sampled under.

    >>> from allinone_gguf.runtime.structured import json_grammar
    >>> "root" in json_grammar({"type": "object", "properties": {"mood": {"enum": ["good", "bad"]}}})
    True

The grammar comes from llama-cpp-python's JSON-Schema-to-GBNF converter (the one llama-server and Ollama use for
`response_format`); the reply's sampler then lets through only tokens that keep the text inside it, so a reply
that ends (not cut by max_tokens) parses and validates. An object with no schema follows llama.cpp's JSON grammar
with an object at the root.
"""
from __future__ import annotations

import json

from llama_cpp import llama_grammar


def json_grammar(schema: dict | None = None) -> str:
    """GBNF for a JSON value valid under `schema`; None = any JSON object. ValueError for a schema it cannot
    turn into a grammar (the message says which part)."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, not {type(schema).__name__}")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, RecursionError, NotImplementedError, AssertionError) as e:
        raise ValueError(f"cannot turn this JSON schema into a grammar: {e}") from None
