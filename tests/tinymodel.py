"""Build tiny random-weight Qwen checkouts (Qwen1.5, Qwen2.5-Instruct, Qwen3 style) with the real Qwen tokenizer.

    python tests/tinymodel.py OUT_DIR                # writes OUT_DIR/tiny-qwen1.5 (fetches the vocab once)
    python tests/tinymodel.py OUT_DIR qwen3          # OUT_DIR/tiny-qwen3; also qwen2.5
    python tests/tinymodel.py OUT_DIR qwen3 --real-size   # OUT_DIR/Qwen3-0.6B: real shapes, zero weights

The tokenizer comes from llama.cpp's `models/ggml-vocab-qwen2.gguf` (made from Qwen1.5-7B), which ships inside
the llama-cpp-python source distribution on PyPI beside `.inp`/`.out`, its reference tokenizations. From it we
write what a Hugging Face Qwen repository holds: vocab.json, merges.txt, tokenizer.json,
tokenizer_config.json (with the chat template), config.json, generation_config.json and safetensors.

The flavours differ as the real checkouts do (`FLAVOURS`): Qwen2.5 and Qwen3 add tokens after <|im_end|>
(vision, tool-call, FIM and, in Qwen3, <think>/</think>), use their own chat templates (llama.cpp's copies in
the same sdist, `models/templates/*.jinja`) and generation settings; Qwen3 is `Qwen3ForCausalLM` with no QKV
bias, per-head q_norm/k_norm and an explicit head_dim that is not hidden_size / num_attention_heads.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np

from convert.reference_files import VENDOR, cache_folder, extract, sdist

VOCAB_FILES = ("ggml-vocab-qwen2.gguf", "ggml-vocab-qwen2.gguf.inp", "ggml-vocab-qwen2.gguf.out")
# llama.cpp's copies of the real chat templates (models/templates/ in the sdist). Qwen2.5-0.5B-Instruct has
# the same template as Qwen2.5-7B-Instruct.
TEMPLATE_FILES = {"qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja", "qwen3": "Qwen-Qwen3-0.6B.jinja"}
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
# Qwen3-0.6B's shape in small: like the real one (hidden 1024, 16 heads of head_dim 128) the heads are twice
# hidden_size / num_attention_heads wide, so a converter that derives head_dim from hidden_size goes wrong.
TINY_QWEN3_CONFIG = dict(TINY_CONFIG, head_dim=128, max_position_embeddings=40960)

# Added tokens after <|im_end|> (151645) in the real Qwen2.5 / Qwen3 tokenizer.json, with their `special`
# flags: Qwen2.5 has ids 151646-151664, Qwen3 also 151665-151668.
EXTRA_ADDED_TOKENS = (
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)

# What differs between the generations, from the real checkouts' config.json, generation_config.json and
# tokenizer_config.json (Qwen1.5-0.5B-Chat, Qwen2.5-0.5B-Instruct, Qwen3-0.6B).
FLAVOURS = {
    "qwen1.5": dict(
        config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                "sliding_window": 32768, "max_window_layers": 21, **TINY_CONFIG},
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                    "do_sample": True, "repetition_penalty": 1.1, "top_p": 0.8, "top_k": 20},
        extra_tokens=0, model_max_length=32768),
    "qwen2.5": dict(
        config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                "sliding_window": 32768, "max_window_layers": 21, **TINY_CONFIG},
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                    "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
                    "top_p": 0.8, "top_k": 20},
        extra_tokens=19, model_max_length=131072),
    "qwen3": dict(
        config={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28, "rope_scaling": None,
                **TINY_QWEN3_CONFIG},
        generation={"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
        extra_tokens=23, model_max_length=131072),
}
# The real models' shapes (their public config.json files), for `--real-size`: zero weights of the real size,
# which give the real GGUF file sizes (a quantized file's size depends on the shapes, not the values).
REAL_SIZES = {
    "qwen1.5": ("Qwen1.5-0.5B-Chat", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768)),
    "qwen2.5": ("Qwen2.5-0.5B-Instruct", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)),
    "qwen3": ("Qwen3-0.6B", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)),
}


def fetch_vocab(cache: Path) -> Path:
    """llama.cpp's models/ folder, holding VOCAB_FILES and templates/TEMPLATE_FILES, extracted from the pinned
    llama-cpp-python sdist (downloaded once; convert/reference_files.py)."""
    root = cache_folder(cache) / "llama.cpp"
    wanted = [f"models/{f}" for f in VOCAB_FILES] + [f"models/templates/{f}" for f in TEMPLATE_FILES.values()]
    if not all((root / w).is_file() for w in wanted):
        extract(cache, wanted, root)
    missing = [w for w in wanted if not (root / w).is_file()]
    if missing:
        raise FileNotFoundError(f"{sdist(cache)}: no {VENDOR}{missing[0]}")
    return root / "models"


def chat_template(vocab_dir: Path, flavour: str) -> str:
    """The flavour's real chat template (Qwen1.5's is short enough to keep here)."""
    if flavour == "qwen1.5":
        return QWEN15_CHAT_TEMPLATE
    return (vocab_dir / "templates" / TEMPLATE_FILES[flavour]).read_text(encoding="utf-8")


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


def weight_shapes(cfg: dict, tied: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a config.json dict: Qwen2 layers with QKV biases, or Qwen3 layers (model_type
    "qwen3") with q_norm/k_norm over head_dim and no biases; lm_head.weight when not tied."""
    h, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    qwen3 = cfg.get("model_type") == "qwen3"
    hd = cfg["head_dim"] if qwen3 else h // cfg["num_attention_heads"]
    q, kv = hd * cfg["num_attention_heads"], hd * cfg["num_key_value_heads"]   # rows of q_proj, k_proj/v_proj
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (rows, h)
            if not qwen3:
                shapes[p + f"self_attn.{name}_proj.bias"] = (rows,)
        if qwen3:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        shapes |= {p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (ff, h),
                   p + "mlp.up_proj.weight": (ff, h), p + "mlp.down_proj.weight": (h, ff)}
    if not tied:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_weights(cfg: dict, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights for weight_shapes: N(0, 0.02), layer norms 1, q/k norms N(1, 0.1) (so that q_norm and
    k_norm swapped or misplaced would show)."""
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith(("layernorm.weight", "model.norm.weight")):
            return np.ones(shape)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            return rng.normal(1, 0.1, shape)
        return rng.normal(0, 0.02, shape)
    return {name: draw(name, shape).astype(np.float32) for name, shape in weight_shapes(cfg, tied).items()}


def write_zero_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file of zeros, written sparse (no memory, little disk)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        f.truncate(8 + len(head) + offset)


def write_tokenizer(vocab_gguf: Path, out: Path, tokenizer_json: bool = True, slow_files: bool = True, *,
                    chat_template: str = QWEN15_CHAT_TEMPLATE, extra_tokens: int = 0,
                    model_max_length: int = 32768) -> None:
    """The tokenizer files; `extra_tokens` of EXTRA_ADDED_TOKENS follow <|im_end|> (19 = Qwen2.5, 23 = Qwen3)."""
    r = gguf.GGUFReader(vocab_gguf)
    f = r.fields
    tokens = [f["tokenizer.ggml.tokens"].contents(i) for i in range(len(f["tokenizer.ggml.tokens"].data))]
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [f["tokenizer.ggml.merges"].contents(i) for i in range(len(f["tokenizer.ggml.merges"].data))]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
    added = [(i, t, True) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.CONTROL]
    first = added[-1][0] + 1                                       # 151646, a [PAD] id in the Qwen1.5 vocab
    added += [(first + k, t, special) for k, (t, special) in enumerate(EXTRA_ADDED_TOKENS[:extra_tokens])]
    if slow_files:
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added_json = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                   "normalized": False, "special": special} for i, t, special in added]
    tokenizer_config = {
        "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "model_max_length": model_max_length, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": chat_template,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added_json},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    if extra_tokens:   # Qwen2.5 and Qwen3 also say these, and list the special <|...|> tokens they added
        tokenizer_config |= {"add_bos_token": False, "clean_up_tokenization_spaces": False}
        tokenizer_config["additional_special_tokens"] += [t for t, special in EXTRA_ADDED_TOKENS[:extra_tokens] if special]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
                                               encoding="utf-8")
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


def build_checkout(vocab_dir: Path, out: Path, *, flavour: str = "qwen1.5", tied: bool = True, shards: int = 1,
                   dtype: str = "BF16", tokenizer_json: bool = True, slow_files: bool = True, seed: int = 0,
                   real_size: bool = False) -> Path:
    """A checkout of one of FLAVOURS (Qwen1.5-style by default); `tied=False` adds lm_head.weight, `shards=2`
    splits the weights with an index. `real_size=True`: the real model's shapes (REAL_SIZES), zero bf16
    weights in one file."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    spec = FLAVOURS[flavour]
    out.mkdir(parents=True, exist_ok=True)
    config = {"hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "tie_word_embeddings": tied,
              "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
              "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, **spec["config"]}
    if real_size:
        config |= REAL_SIZES[flavour][1]
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(spec["generation"]), encoding="utf-8")
    write_tokenizer(vocab_dir / VOCAB_FILES[0], out, tokenizer_json, slow_files,
                    chat_template=chat_template(vocab_dir, flavour), extra_tokens=spec["extra_tokens"],
                    model_max_length=spec["model_max_length"])
    if real_size:
        write_zero_safetensors(out / "model.safetensors", weight_shapes(config, tied))
        return out
    weights = random_weights(config, tied, seed)
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
    import argparse
    ap = argparse.ArgumentParser(description="Build a tiny random-weight Qwen checkout with the real tokenizer.")
    ap.add_argument("out", nargs="?", type=Path, default=Path(".cache"), help="folder to write into (default: .cache)")
    ap.add_argument("flavour", nargs="?", default="qwen1.5", choices=sorted(REAL_SIZES),
                    help="model family (default: qwen1.5)")
    ap.add_argument("--real-size", action="store_true",
                    help="the real model's shapes with zero weights (to measure GGUF file sizes)")
    a = ap.parse_args()
    vocab = fetch_vocab(a.out / "vocab")
    if a.real_size:
        print(build_checkout(vocab, a.out / REAL_SIZES[a.flavour][0], flavour=a.flavour, real_size=True))
    else:
        print(build_checkout(vocab, a.out / f"tiny-{a.flavour}", flavour=a.flavour))
