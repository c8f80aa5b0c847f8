"""Convert a Qwen Hugging Face checkout (Qwen1.5, Qwen2, Qwen2.5, Qwen3) to a GGUF file, tensor by tensor.

    python -m convert to-gguf path/to/Qwen3-0.6B models/Qwen3-0.6B/Qwen3-0.6B-F16.gguf

or from Python: `convert_hf_to_gguf(Path(checkout), Path(out), outtype="F16")`.

The result matches llama.cpp's reference converter (`convert_hf_to_gguf.py --outtype f16` of the llama.cpp
vendored in our pinned llama-cpp-python): the same tensors (names, shapes, types, bytes), hyperparameters and
tokenizer metadata. `Qwen2ForCausalLM` checkouts become GGUF architecture `qwen2` (QKV biases);
`Qwen3ForCausalLM` ones become `qwen3` (no QKV bias, per-head RMS norms `q_norm`/`k_norm` -> `attn_q_norm`/
`attn_k_norm`, an explicit `head_dim` -> `key_length`/`value_length`). Only numpy and the `gguf` package are
used. Memory stays flat in the model's size: the GGUF header is written from the safetensors headers alone, then each tensor is streamed through in row chunks.
The file is written to `<out>.tmp` and renamed at the end, so a failed run leaves no half-written GGUF.

One key is ours and not the reference's: WEIGHTS_KEY (allinone_gguf/runtime/adapter.py), the sha256 of the
checkout's safetensors files, which llama.cpp's quantizer copies into every quantization: the identity a
sentiment adapter is bound to (convert/compare.py names it as the one expected difference).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from allinone_gguf.runtime.adapter import WEIGHTS_KEY, file_sha256, weights_digest

from .safetensors_np import CheckpointError, TensorRef, checkpoint_tensors
from .tokenizer import add_vocab_to_gguf, read_vocab

log = logging.getLogger(__name__)

# Hugging Face architecture class -> GGUF architecture, as llama.cpp's reference converter maps them.
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,   # Qwen1.5, Qwen2, Qwen2.5
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,   # Qwen3 (dense)
}
# What transformers' Qwen3Config assumes when config.json leaves head_dim out; the reference converter
# reads the config through transformers, so it writes this too (and the model's tensors are shaped by it).
QWEN3_DEFAULT_HEAD_DIM = 128
OUTTYPES = {"F16": gguf.LlamaFileType.MOSTLY_F16, "F32": gguf.LlamaFileType.ALL_F32}


def read_config(checkout: Path) -> dict:
    path = checkout / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {checkout} a Hugging Face model checkout?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise CheckpointError(f"{path}: architecture {archs or config.get('model_type')} is not supported; "
                              f"this converter handles {', '.join(SUPPORTED_ARCHITECTURES)} "
                              "(Qwen1.5, Qwen2, Qwen2.5, Qwen3)")
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if key not in config:
            raise CheckpointError(f"{path}: no {key}")
    if model_arch(config) == gguf.MODEL_ARCH.QWEN3:
        _refuse_reranker(checkout, config)
        if config.get("head_dim") is None:
            config["head_dim"] = QWEN3_DEFAULT_HEAD_DIM
    return config


def model_arch(config: dict) -> gguf.MODEL_ARCH:
    """The GGUF architecture of a config that read_config accepted."""
    return next(SUPPORTED_ARCHITECTURES[a] for a in config["architectures"] if a in SUPPORTED_ARCHITECTURES)


def _refuse_reranker(checkout: Path, config: dict) -> None:
    # Qwen3-Reranker checkouts say Qwen3ForCausalLM too; the reference converter recognises them by these
    # hints and writes a ranking model (pooling, a yes/no classifier head), which is no chat model.
    readme = checkout / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    hints = [checkout.name, str(config.get("_name_or_path", "")), str(config.get("model_type", ""))]
    if ("# qwen3-reranker" in text or "# qwen3-vl-reranker" in text
            or any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints)):
        raise CheckpointError(f"{checkout}: a Qwen3 reranker, not a chat model; convert a Qwen3 chat checkout "
                              "such as Qwen/Qwen3-0.6B")


def _gguf_type(gguf_name: str, ndim: int, outtype: str) -> gguf.GGMLQuantizationType:
    # Same rule as the reference: 1-D tensors (biases, norms) and *_norm weights stay F32;
    # only `.weight` matrices take the output type.
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.F16 if outtype == "F16" else gguf.GGMLQuantizationType.F32


def _add_hparams(writer: gguf.GGUFWriter, config: dict, n_layers: int, ftype: gguf.LlamaFileType) -> None:
    """<arch>.* keys (qwen2.*, qwen3.*), in the reference's order (TextModel.set_gguf_parameters)."""
    writer.add_block_count(n_layers)
    for key, add in (("max_position_embeddings", writer.add_context_length),
                     ("hidden_size", writer.add_embedding_length),
                     ("intermediate_size", writer.add_feed_forward_length),
                     ("num_attention_heads", writer.add_head_count),
                     ("num_key_value_heads", writer.add_head_count_kv)):
        if key in config:
            add(config[key])
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in rope and "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    rope_type, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default"):
        raise CheckpointError(f"rope scaling type {rope_type!r} is not supported")
    if "rope_theta" in rope:
        writer.add_rope_freq_base(rope["rope_theta"])
    if "rms_norm_eps" in config:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(ftype)


def write_tensor(fout, t: TensorRef, qtype: gguf.GGMLQuantizationType) -> None:
    np_type = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
    if (t.dtype, np_type) in (("F16", np.float16), ("F32", np.float32)):
        # Already in the output type: copy the bytes through the memory map.
        raw = np.memmap(t.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
        for start in range(0, t.nbytes, 1 << 24):
            fout.write(raw[start:start + (1 << 24)].tobytes())
        del raw
        return
    for chunk in t.rows():
        chunk.astype(np_type).tofile(fout)


def add_general_metadata(writer: gguf.GGUFWriter, folder: Path, default_name: str) -> None:
    """The general.* keys as the reference writes them: from the model card and generation config in `folder`,
    the parameter count of the tensors already added to `writer` (negative for a LoRA file, so no size label)."""
    total_params, shared, expert, n_expert = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, folder, None, total_params)
    if meta.name is None:
        meta.name = default_name
    # gguf 0.19.0 on PyPI predates the vendored gguf-py's reading of HF's own name for this setting.
    if meta.sampling_penalty_repeat is None:
        meta.sampling_penalty_repeat = gguf.Metadata.load_generation_config(folder).get("repetition_penalty")
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, shared, expert, n_expert)
    meta.set_gguf_meta_model(writer)


def write_gguf(writer: gguf.GGUFWriter, out: Path, tensors: list[Callable], total: int,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the header, metadata and tensor infos already added to `writer`, then each tensor's data through
    its function (f -> None, streaming), padded as GGUF wants, to `<out>.tmp`, renamed to `out` at the end: a
    failure leaves no half-written file. `total` bytes drive `progress(done, total)`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        done = 0
        for write in tensors:
            start = fout.tell()
            write(fout)
            written = fout.tell() - start
            writer.write_padding(fout, written)
            done += written
            if progress:
                progress(done, total)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def convert_hf_to_gguf(checkout: Path, out: Path, outtype: str = "F16",
                       progress: Callable[[int, int], None] | None = None,
                       known_sha256: dict[str, str] | None = None) -> Path:
    """Write `out` from the checkout; `progress(done_bytes, total_bytes)` is called after each tensor.
    `known_sha256` ({file name: sha256}, e.g. `make models`' manifest) spares hashing the weight files again."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    checkout = Path(checkout)
    config = read_config(checkout)
    n_layers = config["num_hidden_layers"]
    tensors = checkpoint_tensors(checkout)
    vocab = read_vocab(checkout, config["vocab_size"])   # fail on a bad tokenizer before writing anything
    arch = model_arch(config)
    name_map = gguf.get_tensor_name_map(arch, n_layers)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    plan: list[tuple[TensorRef, gguf.GGMLQuantizationType]] = []
    for t in tensors:
        if t.name.endswith(".rotary_emb.inv_freq"):
            continue
        gname = name_map.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise CheckpointError(f"{t.path}: tensor {t.name} has no place in a {gguf.MODEL_ARCH_NAMES[arch]} GGUF")
        qtype = _gguf_type(gname, len(t.shape), outtype)
        itemsize = 2 if qtype == gguf.GGMLQuantizationType.F16 else 4
        writer.add_tensor_info(gname, t.shape, np.dtype(np.float16 if itemsize == 2 else np.float32),
                               t.n_elements * itemsize, raw_dtype=qtype)
        plan.append((t, qtype))

    # Metadata in the reference's order: general.type, general.* from the model card, (our weights key, early so
    # the runtime reads it without walking the tokenizer's arrays,) hparams, quantization version, the tokenizer.
    writer.add_type(gguf.GGUFType.MODEL)
    add_general_metadata(writer, checkout, checkout.name)
    known = known_sha256 or {}
    writer.add_string(WEIGHTS_KEY, weights_digest({p.name: known.get(p.name) or file_sha256(p)
                                                   for p in {t.path for t in tensors}}))
    _add_hparams(writer, config, n_layers, OUTTYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab_to_gguf(writer, vocab)

    total = sum(t.n_elements * (2 if q == gguf.GGMLQuantizationType.F16 else 4) for t, q in plan)
    out = write_gguf(writer, Path(out), [lambda f, t=t, q=q: write_tensor(f, t, q) for t, q in plan], total,
                     progress)
    log.info("wrote %s (%d tensors)", out, len(plan))
    return out
