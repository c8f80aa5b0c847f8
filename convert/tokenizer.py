"""The GGUF tokenizer block of a Qwen checkout (Qwen1.5 to Qwen3), read without transformers or tokenizers.

    >>> vocab = read_vocab(Path("Qwen1.5-0.5B-Chat"), vocab_size=151936)   # doctest: +SKIP
    >>> vocab.pre, len(vocab.tokens), vocab.types[151645]                   # doctest: +SKIP
    ('qwen2', 151936, 3)

Token list and token types follow llama.cpp's reference converter (`get_vocab_base`): ids missing from
the vocabulary become `[PAD{id}]` (UNUSED), added tokens that are special or look like `<|...|>` become
CONTROL, other added tokens USER_DEFINED (Qwen2.5's `<tool_call>`, Qwen3's `<think>`), the rest NORMAL.
Merges, special-token ids and the chat template come from gguf's own `SpecialVocab`, exactly as the
reference writes them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from .safetensors_np import CheckpointError

# The pre-tokenizer regex of Qwen1.5 / Qwen2 / Qwen2.5 / Qwen3 (tokenizer.json and Qwen2Tokenizer's PRETOKENIZE_REGEX);
# llama.cpp implements it under the name "qwen2".
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PRE = "qwen2"


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]       # gguf.TokenType values, one per token
    pre: str
    special: gguf.SpecialVocab


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _looks_special(token: str) -> bool:
    # Same rule as the reference's does_token_look_special, for the token shapes Qwen uses.
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def _base_and_added(checkout: Path) -> tuple[dict[str, int], dict[int, tuple[str, bool]]]:
    """(base vocabulary token -> id, added id -> (content, special)) from tokenizer.json or vocab.json."""
    tj_path = checkout / "tokenizer.json"
    if tj_path.is_file():
        tj = _read_json(tj_path)
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise CheckpointError(f"{tj_path}: tokenizer model is {model.get('type')!r}, expected BPE (Qwen's)")
        regexes = [p.get("pattern", {}).get("Regex") for p in (tj.get("pre_tokenizer") or {}).get("pretokenizers", [])]
        if QWEN2_PRETOKENIZER_REGEX not in regexes:
            raise CheckpointError(f"{tj_path}: pre-tokenizer is not Qwen2's; only Qwen tokenizers (Qwen1.5 to Qwen3) are supported")
        added = {a["id"]: (a["content"], bool(a.get("special"))) for a in tj.get("added_tokens", [])}
        return dict(model["vocab"]), added
    vj_path = checkout / "vocab.json"
    if not vj_path.is_file():
        raise CheckpointError(f"{checkout}: neither tokenizer.json nor vocab.json + merges.txt found")
    if not (checkout / "merges.txt").is_file():
        raise CheckpointError(f"{checkout / 'merges.txt'}: missing (needed beside vocab.json)")
    tc_path = checkout / "tokenizer_config.json"
    decoder = _read_json(tc_path).get("added_tokens_decoder", {}) if tc_path.is_file() else {}
    added = {int(i): (a["content"], bool(a.get("special"))) for i, a in decoder.items()}
    return _read_json(vj_path), added


def _byte_level_adds_nothing(checkout: Path, special: gguf.SpecialVocab) -> None:
    """A ByteLevel post-processor adds no BOS/EOS: say so in the GGUF, as the reference does.

    The gguf-py vendored with llama.cpp records this (and lets the post-processor win over
    tokenizer_config's add_*_token); gguf 0.19.0 on PyPI does not yet, so we apply the same rule here.
    """
    tj_path = checkout / "tokenizer.json"
    if not tj_path.is_file():
        return
    post = _read_json(tj_path).get("post_processor") or {}
    if any(p.get("type") == "ByteLevel" for p in post.get("processors", [post])):
        special.add_special_token.update(bos=False, eos=False)


def read_vocab(checkout: Path, vocab_size: int) -> Vocab:
    base, added = _base_and_added(checkout)
    reverse = {i: t for t, i in base.items()}
    reverse.update({i: content for i, (content, _) in added.items()})
    if reverse and max(reverse) >= vocab_size:
        raise CheckpointError(f"{checkout}: token id {max(reverse)} does not fit vocab_size {vocab_size} of config.json")
    added_by_content = {content: special for content, special in added.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added_by_content:
            special = added_by_content[token] or _looks_special(token)
            # The reference pre-normalizes user-defined tokens' SentencePiece spaces (U+2581).
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(checkout, load_merges=True)
    _byte_level_adds_nothing(checkout, special)
    if not special.merges:
        raise CheckpointError(f"{checkout}: no BPE merges in tokenizer.json or merges.txt")
    return Vocab(tokens, types, QWEN2_PRE, special)


def add_vocab_to_gguf(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)
