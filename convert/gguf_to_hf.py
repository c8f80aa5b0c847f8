"""Rebuild a Hugging Face checkout from a Qwen GGUF file (the reverse of hf_to_gguf.py), torch-free.

    python -m convert checkout models/Qwen2.5-0.5B-Instruct/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf /tmp/qwen-hf

or from Python: `convert_gguf_to_hf(Path(gguf_file), Path(out_dir))`.

For people who only have a GGUF (the `*-GGUF` repositories) and want to fine-tune: the result is what
transformers loads (`AutoModelForCausalLM.from_pretrained(out_dir)`) and what our converter turns back into
a GGUF. Architectures `qwen2` (Qwen1.5, Qwen2, Qwen2.5) and `qwen3` (Qwen3, dense).

- **Tensors:** every tensor is dequantized by the `gguf` package (`gguf.quants.dequantize`: Q8_0, Q4_K,
  Q6_K, ...) into one `model.safetensors`. F32, F16 and BF16 tensors keep their bytes (so a F16 GGUF
  comes back bit for bit); quantized ones become `dtype` (F16 by default: 10 mantissa bits, more than any
  GGUF quantization keeps; BF16 if a value overflows F16, which the run says). Names go back through the
  same `gguf` name map hf_to_gguf.py uses forwards; llama.cpp permutes no qwen2/qwen3 tensor (its
  converter reorders q/k rows for llama only), so only the names change. No `output.weight` in the GGUF
  means tied embeddings: no `lm_head.weight`.
- **config.json** from the `<arch>.*` hyperparameters; **generation_config.json** from the token ids and
  the `general.sampling.*` keys, when the GGUF has those.
- **Tokenizer:** tokenizer.json (byte-level BPE with Qwen's pre-tokenizer regex, from
  `tokenizer.ggml.tokens/merges/token_type`), vocab.json + merges.txt, and tokenizer_config.json (the chat
  template, added tokens, eos/pad). CONTROL tokens become special added tokens, USER_DEFINED ones plain
  added tokens, UNUSED ids (`[PAD151646]`) are left out, as the checkouts leave them out.
- **README.md** front matter carries the `general.*` names (so the GGUF made again keeps them), and
  `gguf_source.json` says which file this was rebuilt from and how (`find_checkout` uses it as a cache key).

What cannot come back: the precision the quantization threw away (a Q4_K_M file gives Q4_K_M's weights in
F16), and whatever the GGUF never held (the original dtype, model-card prose). The folder is written as
`<out>.tmp` and renamed at the end, so a failed run leaves no half-made checkout.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from allinone_gguf.runtime.adapter import WEIGHTS_KEY

from .hf_to_gguf import SUPPORTED_ARCHITECTURES
from .safetensors_np import CheckpointError
from .tokenizer import QWEN2_PRE, QWEN2_PRETOKENIZER_REGEX

log = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"     # in the rebuilt checkout: which GGUF it came from (name, size, mtime)
DTYPES = ("F16", "BF16")             # what quantized tensors become
# safetensors dtype of each GGUF type that is kept bit for bit (raw storage dtype, bytes per element)
_EXACT = {gguf.GGMLQuantizationType.F32: ("F32", 4), gguf.GGMLQuantizationType.F16: ("F16", 2),
          gguf.GGMLQuantizationType.BF16: ("BF16", 2)}
_TORCH_DTYPE = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
# general.sampling.<key> -> generation_config.json key, as gguf.Metadata reads them back (hf_to_gguf.py also
# reads HF's repetition_penalty)
_SAMPLING = {"top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "temp": "temperature",
             "penalty_repeat": "repetition_penalty", "penalty_last_n": "penalty_last_n", "sequence": "sequence",
             "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold", "mirostat": "mirostat",
             "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}
# general.<key> -> model-card front matter key that gguf.Metadata.load reads back into general.<key>
_CARD = {"name": "name", "basename": "basename", "finetune": "finetune", "size_label": "size_label",
         "organization": "organization", "version": "version", "license": "license"}
_ROWS_PER_CHUNK = 1 << 12             # rows dequantized at once (151,936-row embeddings go in 38 pieces)


def _hf_architecture(arch: str) -> str:
    for hf, a in SUPPORTED_ARCHITECTURES.items():
        if gguf.MODEL_ARCH_NAMES[a] == arch:
            return hf
    names = ", ".join(gguf.MODEL_ARCH_NAMES[a] for a in SUPPORTED_ARCHITECTURES.values())
    raise CheckpointError(f"GGUF architecture {arch!r} is not supported; this rebuild handles {names} "
                          "(Qwen1.5 to Qwen3)")


def _fields(reader: gguf.GGUFReader) -> dict[str, object]:
    """Scalar and string-array metadata as Python values (the token arrays are read separately)."""
    out = {}
    for name, f in reader.fields.items():
        if not f.types or name.startswith("GGUF."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        out[name] = f.contents()
    return out


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that gives the same float32 back (1e-06, not
    9.999999974752427e-07)."""
    return float(str(np.float32(x)))


def hf_tensor_names(arch: gguf.MODEL_ARCH, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, by running the Qwen checkout names through the same name map
    hf_to_gguf.py uses forwards (so the two cannot disagree)."""
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    hf = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        hf += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
               p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight", p + "self_attn.o_proj.weight",
               p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
        hf += [p + f"self_attn.{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")]
    out = {}
    for name in hf:
        g = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            out[g] = name
    return out


def config_from_gguf(fields: dict, arch: str, n_vocab: int, tied: bool, torch_dtype: str,
                     has_qkv_bias: bool) -> dict:
    """config.json for the GGUF's `<arch>.*` hyperparameters (the keys hf_to_gguf.py reads back)."""
    def get(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if get(key) is None:
            raise CheckpointError(f"the GGUF has no {arch}.{key}")
    heads = int(get("attention.head_count"))
    hf_arch = _hf_architecture(arch)
    config = {
        "architectures": [hf_arch], "model_type": arch,
        "hidden_size": int(get("embedding_length")), "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(get("context_length", 32768)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "vocab_size": n_vocab, "tie_word_embeddings": tied, "torch_dtype": torch_dtype,
        "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": int(get("block_count")),
    }
    k, v = get("attention.key_length"), get("attention.value_length")
    if k is not None or v is not None:
        if k != v:
            raise CheckpointError(f"{arch}.attention.key_length {k} != value_length {v}: not a Qwen layout")
        config["head_dim"] = int(k)
    if hf_arch == "Qwen3ForCausalLM":
        config["attention_bias"] = has_qkv_bias
        config.setdefault("head_dim", config["hidden_size"] // heads)
    scaling = get("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"type": scaling, "factor": _f32(get("rope.scaling.factor"))}
        if scaling == "yarn":
            original = int(get("rope.scaling.original_context_length"))
            config["rope_scaling"]["original_max_position_embeddings"] = original
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{arch}.rope.scaling.type {scaling!r} is not supported")
    for typ in ("bos", "eos"):
        if f"tokenizer.ggml.{typ}_token_id" in fields:
            config[f"{typ}_token_id"] = int(fields[f"tokenizer.ggml.{typ}_token_id"])
    return config


def generation_config_from_gguf(fields: dict) -> dict | None:
    """generation_config.json from the sampling settings the GGUF carries, or None when it carries none."""
    sampling = {hf: fields[f"general.sampling.{key}"] for key, hf in _SAMPLING.items()
                if f"general.sampling.{key}" in fields}
    if not sampling:
        return None
    out = {f"{hf}_token_id": int(fields[f"tokenizer.ggml.{key}_token_id"])
           for hf, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
           if f"tokenizer.ggml.{key}_token_id" in fields}
    out["do_sample"] = True
    for k, v in sampling.items():
        out[k] = _f32(v) if isinstance(v, float) else v
    return out


def tokenizer_files(reader: gguf.GGUFReader, fields: dict, context_length: int) -> dict[str, object]:
    """{file name: JSON object or text} of the tokenizer files, from the GGUF's tokenizer.ggml.* arrays."""
    if fields.get("tokenizer.ggml.model") != "gpt2" or fields.get("tokenizer.ggml.pre") != QWEN2_PRE:
        raise CheckpointError(f"tokenizer {fields.get('tokenizer.ggml.model')!r}/{fields.get('tokenizer.ggml.pre')!r} "
                              f"is not Qwen's (gpt2/{QWEN2_PRE})")
    if fields.get("tokenizer.ggml.add_bos_token") or fields.get("tokenizer.ggml.add_eos_token"):
        raise CheckpointError("the GGUF's tokenizer adds BOS/EOS tokens, which Qwen's never does")
    f = reader.fields
    tokens = [f["tokenizer.ggml.tokens"].contents(i) for i in range(len(f["tokenizer.ggml.tokens"].data))]
    types = [int(t) for t in f["tokenizer.ggml.token_type"].contents()]
    merges_field = f.get("tokenizer.ggml.merges")
    merges = [merges_field.contents(i) for i in range(len(merges_field.data))] if merges_field else []
    if not merges:
        raise CheckpointError("the GGUF has no tokenizer.ggml.merges")
    vocab, added = {}, []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == gguf.TokenType.NORMAL:
            vocab[tok] = i
        elif ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": ty == gguf.TokenType.CONTROL})
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZER_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level}]},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }

    def token(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    # bos stays None as in Qwen's own files: its id is config.json's bos_token_id (which the GGUF got it from)
    config = {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": token("eos"),
        "pad_token": token("padding"), "unk_token": None, "errors": "replace", "model_max_length": context_length,
        "split_special_tokens": False, "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "additional_special_tokens": [t for t in ("<|im_start|>", "<|im_end|>") if t in {a["content"] for a in added}],
    }
    if "tokenizer.chat_template" in fields:
        config["chat_template"] = fields["tokenizer.chat_template"]
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config, "vocab.json": vocab,
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}


def model_card(fields: dict, source: Path) -> str:
    """README.md: front matter with the general.* names (gguf.Metadata reads them back), and where it came from."""
    front = [f"{card}: {json.dumps(fields[f'general.{key}'], ensure_ascii=False)}" for key, card in _CARD.items()
             if isinstance(fields.get(f"general.{key}"), str)]
    return ("---\n" + "".join(line + "\n" for line in front) + "---\n\n"
            f"Rebuilt from `{source.name}` by `python -m convert checkout` (every tensor dequantized from the "
            "GGUF; config and tokenizer from its metadata). The weights are the GGUF's, not the original "
            "checkout's: a quantized file's rounding is in them.\n")


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest even


def _write_tensor(fout, t: gguf.ReaderTensor, dtype: str) -> None:
    """One tensor's data: raw bytes when kept exactly, else dequantized in row chunks and rounded to `dtype`."""
    data = t.data
    if t.tensor_type in _EXACT:
        fout.write(np.ascontiguousarray(data).view(np.uint8).tobytes())
        return
    rows = data.reshape(-1, data.shape[-1])
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        x = gguf.quants.dequantize(np.asarray(rows[start:start + _ROWS_PER_CHUNK]), t.tensor_type)
        if dtype == "F16":
            y = x.astype(np.float16)
            if not np.isfinite(y).all() and np.isfinite(x).all():
                raise OverflowError(t.name)
            fout.write(y.tobytes())
        else:
            fout.write(_bf16_bits(x).tobytes())


def _safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)       # the data starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head


def convert_gguf_to_hf(model: Path, out: Path, dtype: str = "F16",
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a Hugging Face checkout of the GGUF `model` into the folder `out` (which must not exist or be
    empty); `progress(done_tensors, total_tensors)` after each tensor. Quantized tensors become `dtype`."""
    model, out = Path(model), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no such file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty folder; choose a new one")
    try:
        reader = gguf.GGUFReader(model)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{model}: not a GGUF file ({e})") from None
    fields = _fields(reader)
    arch = str(fields.get("general.architecture"))
    hf_arch = _hf_architecture(arch)
    n_layers = int(fields.get(f"{arch}.block_count", 0))
    names = hf_tensor_names(SUPPORTED_ARCHITECTURES[hf_arch], n_layers)
    plan = []   # (tensor, hf name, safetensors dtype, shape in PyTorch order)
    for t in reader.tensors:
        if t.name not in names:
            raise CheckpointError(f"{model}: tensor {t.name} has no place in a {hf_arch} checkout")
        kept = _EXACT.get(t.tensor_type)
        plan.append((t, names[t.name], kept[0] if kept else dtype, tuple(int(x) for x in reversed(t.shape))))
    plan.sort(key=lambda p: p[1])          # safetensors order: by name, as hf_to_gguf.py reads them
    by_name = {p[1]: p for p in plan}
    if "model.embed_tokens.weight" not in by_name:
        raise CheckpointError(f"{model}: no token_embd.weight")
    n_vocab = by_name["model.embed_tokens.weight"][3][0]
    tied = "lm_head.weight" not in by_name
    has_bias = any(n.endswith("_proj.bias") for n in by_name)
    matrices = {p[2] for p in plan if len(p[3]) > 1}   # their dtype is the checkout's torch_dtype
    torch_dtype = _TORCH_DTYPE[matrices.pop() if len(matrices) == 1 else dtype]
    config = config_from_gguf(fields, arch, n_vocab, tied, torch_dtype, has_bias)
    files: dict[str, object] = {"config.json": config}
    generation = generation_config_from_gguf(fields)
    if generation:
        files["generation_config.json"] = generation
    files |= tokenizer_files(reader, fields, config["max_position_embeddings"])
    st = model.stat()
    files[SOURCE_FILE] = {"gguf": model.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                          WEIGHTS_KEY: fields.get(WEIGHTS_KEY), "dequantized_to": dtype,
                          "tensor_types": sorted({t.tensor_type.name for t, *_ in plan})}
    files["README.md"] = model_card(fields, model)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        with open(tmp / "model.safetensors", "wb") as fout:
            fout.write(_safetensors_header([(n, d, s) for _, n, d, s in plan]))
            for i, (t, name, d, _) in enumerate(plan):
                try:
                    _write_tensor(fout, t, d)
                except OverflowError:
                    raise CheckpointError(f"{model}: {t.name} has values beyond F16's range (65504); "
                                          "rebuild with --dtype BF16") from None
                if progress:
                    progress(i + 1, len(plan))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("rebuilt %s from %s (%d tensors, %s)", out, model.name, len(plan),
             ", ".join(sorted({t.tensor_type.name for t, *_ in plan})))
    return out
