"""Build a tiny random-weight Qwen2 checkout that carries the real Qwen1.5 tokenizer.

    python tests/tinymodel.py OUT_DIR            # writes OUT_DIR/tiny-qwen1.5 (fetches the vocab once)

The tokenizer comes from llama.cpp's `models/ggml-vocab-qwen2.gguf` (made from Qwen1.5-7B), which ships inside
the llama-cpp-python source distribution on PyPI beside `.inp`/`.out`, its reference tokenizations. From it we
write what a Hugging Face Qwen1.5 repository holds: vocab.json, merges.txt, tokenizer.json,
tokenizer_config.json (with the ChatML template), config.json and bf16 safetensors.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np

VOCAB_FILES = ("ggml-vocab-qwen2.gguf", "ggml-vocab-qwen2.gguf.inp", "ggml-vocab-qwen2.gguf.out")
QWEN15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Small enough to build in a second, large enough that K-quants apply (rows are multiples of 256).
TINY_CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)


def fetch_vocab(cache: Path) -> Path:
    """The folder holding VOCAB_FILES, extracted from the pinned llama-cpp-python sdist (downloaded once)."""
    version = metadata.version("llama-cpp-python")
    folder = cache / f"llama-cpp-python-{version}"
    if all((folder / f).is_file() for f in VOCAB_FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sdists = list(folder.glob("*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(folder), f"llama-cpp-python=={version}"], check=True)
        sdists = list(folder.glob("*.tar.gz"))
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(tuple(f"vendor/llama.cpp/models/{f}" for f in VOCAB_FILES)):
                (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return folder


def reference_tokenizations(vocab_dir: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs from llama.cpp's .inp/.out files."""
    texts = (vocab_dir / VOCAB_FILES[1]).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (vocab_dir / VOCAB_FILES[2]).read_text(encoding="utf-8").split("\n")
    # .inp ends with a separator line; .out has one line per text
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


def _bf16_bytes(x: np.ndarray) -> bytes:
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16   # round to nearest even
    return rounded.astype(np.uint16).tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "BF16") -> None:
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in tensors.items():
        blob = _bf16_bytes(arr) if dtype == "BF16" else arr.astype({"F16": np.float16, "F32": np.float32}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def random_weights(cfg: dict, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    w = {"model.embed_tokens.weight": rng.normal(0, 0.02, (v, h)), "model.norm.weight": np.ones(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": np.ones(h), p + "post_attention_layernorm.weight": np.ones(h),
              p + "self_attn.q_proj.weight": rng.normal(0, 0.02, (h, h)), p + "self_attn.q_proj.bias": rng.normal(0, 0.02, h),
              p + "self_attn.k_proj.weight": rng.normal(0, 0.02, (kv, h)), p + "self_attn.k_proj.bias": rng.normal(0, 0.02, kv),
              p + "self_attn.v_proj.weight": rng.normal(0, 0.02, (kv, h)), p + "self_attn.v_proj.bias": rng.normal(0, 0.02, kv),
              p + "self_attn.o_proj.weight": rng.normal(0, 0.02, (h, h)),
              p + "mlp.gate_proj.weight": rng.normal(0, 0.02, (ff, h)), p + "mlp.up_proj.weight": rng.normal(0, 0.02, (ff, h)),
              p + "mlp.down_proj.weight": rng.normal(0, 0.02, (h, ff))}
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.02, (v, h))
    return {k: a.astype(np.float32) for k, a in w.items()}


def write_tokenizer(vocab_gguf: Path, out: Path, tokenizer_json: bool = True, slow_files: bool = True) -> None:
    r = gguf.GGUFReader(vocab_gguf)
    f = r.fields
    tokens = [f["tokenizer.ggml.tokens"].contents(i) for i in range(len(f["tokenizer.ggml.tokens"].data))]
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [f["tokenizer.ggml.merges"].contents(i) for i in range(len(f["tokenizer.ggml.merges"].data))]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
    added = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.CONTROL]
    if slow_files:
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added_json = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                   "normalized": False, "special": True} for i, t in added]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN15_CHAT_TEMPLATE,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added_json},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }, indent=2, ensure_ascii=False), encoding="utf-8")
    if tokenizer_json:
        (out / "tokenizer.json").write_text(json.dumps({
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_json,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZER_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges},
        }, ensure_ascii=False), encoding="utf-8")


def build_checkout(vocab_dir: Path, out: Path, *, tied: bool = True, shards: int = 1, dtype: str = "BF16",
                   tokenizer_json: bool = True, slow_files: bool = True, seed: int = 0) -> Path:
    """A Qwen1.5-style checkout; `tied=False` adds lm_head.weight, `shards=2` splits it with an index."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_CONFIG)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": tied, "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, **cfg}, indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True,
        "repetition_penalty": 1.1, "top_p": 0.8, "top_k": 20}), encoding="utf-8")
    write_tokenizer(vocab_dir / VOCAB_FILES[0], out, tokenizer_json, slow_files)
    weights = random_weights(cfg, tied, seed)
    names = list(weights)
    if shards == 1:
        write_safetensors(out / "model.safetensors", weights, dtype)
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            part = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            chunk = {n: weights[n] for n in names[s * per:(s + 1) * per]}
            write_safetensors(out / part, chunk, dtype)
            weight_map |= {n: part for n in chunk}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache")
    print(build_checkout(fetch_vocab(root / "vocab"), root / "tiny-qwen1.5"))


def fetch_reference_converter(vocab_dir: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/) from the same sdist."""
    root = vocab_dir / "reference"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = next(vocab_dir.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/vendor/llama.cpp/", 1)[-1] if "/vendor/llama.cpp/" in member.name else None
            if member.isfile() and rel and (rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/gguf/"))):
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
    return script
