"""Convert a PEFT LoRA adapter of a Qwen2 / Qwen3 model to a GGUF LoRA file, tensor by tensor, without torch.

    python -m convert lora ADAPTER_DIR models/Qwen2.5-0.5B-Instruct/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf out.gguf
    python -m convert lora ADAPTER_DIR path/to/Qwen2.5-0.5B-Instruct out.gguf --outtype F32

or from Python: `convert_lora_to_gguf(Path(adapter_dir), Path(base), Path(out), outtype="F16")`.

ADAPTER_DIR holds what PEFT's `save_pretrained` writes: adapter_config.json and adapter_model.safetensors. The
base is the model the adapter was trained on, as a GGUF file or as its Hugging Face checkout (only config.json
is needed; with the weights, or with a GGUF, every adapted matrix is checked against the base's shape, so an
adapter made for another model fails here instead of in llama.cpp).

The result is byte for byte what llama.cpp's `convert_lora_to_gguf.py --outtype f16 --base CHECKOUT` writes (the
llama.cpp vendored in our pinned llama-cpp-python; tests/test_lora_convert.py proves it): general.type =
adapter, adapter.type = lora, adapter.lora.alpha, the general.* keys llama.cpp derives from the adapter folder
(its name, its README model card), no hyperparameters, no vocabulary; for each adapted matrix W (out, in) of the
base, `<gguf name of W>.lora_a` = lora_A (rank, in) and `.lora_b` = lora_B (out, rank), untransposed, in the
order the adapter file stores them (except the embedding's lora_a, stored transposed as llama.cpp reads it).
llama.cpp scales the product by alpha / rank (rank from lora_b), which is PEFT's plain LoRA scaling.

Refused in one line, where llama.cpp would compute something else or fail later: DoRA, rank-stabilised
scaling (alpha / sqrt(rank); llama.cpp's converter writes it unchanged, so its scale would be silently wrong),
per-module alphas, LoRA biases, modules_to_save and other full tensors, a module the base has not.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from allinone_gguf.runtime import AdapterError   # one class for "this adapter cannot be used", converted or loaded

from .hf_to_gguf import (OUTTYPES, SUPPORTED_ARCHITECTURES, write_tensor, add_general_metadata, model_arch,
                         read_config, write_gguf)
from .safetensors_np import CheckpointError, SafetensorsFile, TensorRef, checkpoint_tensors

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's names: base_model.model.<module>.lora_A.weight for Linear layers, .lora_embedding_A for Embedding ones.
PEFT_PREFIX = "base_model.model."
LORA_A_MARKS = (".lora_A.weight", ".lora_embedding_A")
LORA_B_MARKS = (".lora_B.weight", ".lora_embedding_B")
GGUF_ARCHS = {gguf.MODEL_ARCH_NAMES[a]: a for a in SUPPORTED_ARCHITECTURES.values()}


@dataclass(frozen=True)
class BaseModel:
    arch: gguf.MODEL_ARCH
    n_layers: int
    folder_name: str                            # checkout folder or GGUF stem: general.name if the adapter gives none
    shapes: dict[str, tuple[int, ...]] | None   # GGUF tensor name -> PyTorch-order shape; None: config.json only
    path: Path


@dataclass(frozen=True)
class LoraPair:
    name: str            # GGUF name of the adapted base matrix, e.g. blk.0.attn_q.weight
    a: TensorRef         # lora_A (rank, in); embeddings: lora_embedding_A (rank, vocab)
    b: TensorRef         # lora_B (out, rank)

    @property
    def embedding(self) -> bool:
        # llama.cpp's llm_build_inp_embd takes the embedding's lora_a as (vocab, rank): written transposed.
        return self.name == "token_embd.weight"

    @property
    def a_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.a.shape)) if self.embedding else self.a.shape


def read_base(base: Path) -> BaseModel:
    """The architecture, depth and matrix shapes of a base model given as a GGUF file or a checkout folder."""
    base = Path(base)
    if base.is_dir():
        config = read_config(base)
        arch, n_layers = model_arch(config), config["num_hidden_layers"]
        shapes = None
        if any(base.glob("model*.safetensors")) or (base / "model.safetensors.index.json").is_file():
            name_map = gguf.get_tensor_name_map(arch, n_layers)
            shapes = {}
            for t in checkpoint_tensors(base):
                gname = name_map.get_name(t.name, try_suffixes=(".weight", ".bias"))
                if gname is not None:
                    shapes[gname] = t.shape
        return BaseModel(arch, n_layers, base.name, shapes, base)
    if not base.is_file():
        raise FileNotFoundError(f"{base}: no such base model (give its GGUF file or its checkout folder)")
    try:
        reader = gguf.GGUFReader(base)
    except (ValueError, OSError) as e:
        raise AdapterError(f"{base}: not a GGUF file ({e})") from None
    fields = reader.fields

    def field(key: str):
        return fields[key].contents() if key in fields else None
    if field("general.type") == gguf.GGUFType.ADAPTER:
        raise AdapterError(f"{base}: a LoRA adapter, not a base model")
    arch_name = field("general.architecture")
    if arch_name not in GGUF_ARCHS:
        raise AdapterError(f"{base}: architecture {arch_name!r} is not supported; "
                           f"this converter handles {', '.join(GGUF_ARCHS)} (Qwen1.5, Qwen2, Qwen2.5, Qwen3)")
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    return BaseModel(GGUF_ARCHS[arch_name], int(field(f"{arch_name}.block_count")), base.stem, shapes, base)


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, refusing what a GGUF LoRA cannot express (see the module docstring)."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: missing; is {adapter_dir} a PEFT adapter folder (save_pretrained)?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    refusals = (
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')!r}: only LORA adapters"),
        (config.get("use_dora"), "DoRA (use_dora) is not supported by llama.cpp; train with use_dora=False"),
        (config.get("use_rslora"), "rank-stabilised LoRA (use_rslora: alpha / sqrt(r)) is not supported; llama.cpp "
                                   "scales by alpha / r, so train with use_rslora=False"),
        (config.get("alpha_pattern"), f"per-module lora_alpha (alpha_pattern {config.get('alpha_pattern')}) is not "
                                      "supported; a GGUF LoRA has one alpha"),
        (config.get("lora_bias"), "LoRA biases (lora_bias) are not supported by llama.cpp"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} trains base biases, which a GGUF LoRA "
                                               "cannot carry; train with bias='none'"),
        (config.get("modules_to_save"), f"modules_to_save {config.get('modules_to_save')} are full copies of modules, "
                                        "which a GGUF LoRA cannot carry"),
        (config.get("layer_replication"), "layer_replication changes the model's layers; not supported"),
        (config.get("invocation_string") and not config.get("alora_invocation_tokens"),
         "an aLoRA invocation_string without alora_invocation_tokens; give the token ids"),
        (not isinstance(config.get("lora_alpha"), (int, float)), "no numeric lora_alpha"),
    )
    for refused, why in refusals:
        if refused:
            raise AdapterError(f"{path}: {why}")
    return config


def _module_name(name: str) -> str:
    """The base model tensor a PEFT tensor adapts (llama.cpp's get_base_tensor_name)."""
    base = name.replace(PEFT_PREFIX, "")
    for mark in LORA_A_MARKS + LORA_B_MARKS:
        base = base.replace(mark, ".weight")
    return base


def plan_pairs(tensors: list[TensorRef], base: BaseModel) -> list[LoraPair]:
    """lora_A/lora_B pairs in the order the adapter file stores them (by first appearance), mapped to GGUF names
    of `base` and checked against its shapes."""
    name_map = gguf.get_tensor_name_map(base.arch, base.n_layers)
    halves: dict[str, dict[str, TensorRef]] = {}
    for t in sorted(tensors, key=lambda t: t.offset):
        if not any(m in t.name for m in LORA_A_MARKS + LORA_B_MARKS):
            if ".base_layer.weight" in t.name:
                continue                      # llama.cpp's converter skips these too
            raise AdapterError(f"{t.path}: tensor {t.name} is not a lora_A/lora_B matrix (a full tensor, bias or "
                               "DoRA magnitude); a GGUF LoRA cannot carry it")
        module = _module_name(t.name)
        gname = name_map.get_name(module, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise AdapterError(f"{t.path}: {module} (from {t.name}) has no place in a "
                               f"{base.n_layers}-layer {gguf.MODEL_ARCH_NAMES[base.arch]} model; wrong base?")
        halves.setdefault(gname, {})["a" if any(m in t.name for m in LORA_A_MARKS) else "b"] = t
    pairs = []
    for gname, h in halves.items():
        if len(h) != 2:
            have, lack = ("lora_A", "lora_B") if "a" in h else ("lora_B", "lora_A")
            raise AdapterError(f"{next(iter(h.values())).path}: {gname} has a {have} but no {lack}")
        pair = LoraPair(gname, h["a"], h["b"])
        _check_shapes(pair, base)
        pairs.append(pair)
    if not pairs:
        raise AdapterError(f"{tensors[0].path if tensors else 'adapter'}: no LoRA tensors")
    return pairs


def _check_shapes(pair: LoraPair, base: BaseModel) -> None:
    a, b = pair.a.shape, pair.b.shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise AdapterError(f"{pair.a.path}: {pair.name}: lora_A {a} and lora_B {b} are not a rank-r pair")
    if base.shapes is None:
        return
    if pair.name not in base.shapes:
        tied = pair.name == "output.weight"
        why = " (lm_head is tied to the embeddings; leave it out of target_modules)" if tied else ""
        raise AdapterError(f"{base.path}: has no {pair.name} for the adapter's LoRA on it{why}")
    want = (a[1], b[0]) if pair.embedding else (b[0], a[1])
    if base.shapes[pair.name] != want:
        raise AdapterError(f"{pair.a.path}: LoRA for {pair.name} is {want}, the base's matrix is "
                           f"{base.shapes[pair.name]}; adapter made for another model?")


def _write_transposed(fout, t: TensorRef, qtype: gguf.GGMLQuantizationType) -> None:
    # Only the embedding's lora_a (rank x vocab, a few MB): read whole.
    whole = np.concatenate(list(t.rows())).reshape(t.shape)
    np_type = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
    np.ascontiguousarray(whole.T).astype(np_type).tofile(fout)


def convert_lora_to_gguf(adapter_dir: Path, base: Path, out: Path, outtype: str = "F16",
                         progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `out` from the PEFT adapter in `adapter_dir` for `base` (GGUF file or checkout folder);
    `progress(done_bytes, total_bytes)` is called after each tensor."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickle = " (adapter_model.bin is a torch pickle; save with safe_serialization=True)" if (
            adapter_dir / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{weights}: missing{pickle}")
    model = read_base(base)
    try:
        pairs = plan_pairs(SafetensorsFile(weights).tensors, model)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None

    qtype = gguf.GGMLQuantizationType.F16 if outtype == "F16" else gguf.GGMLQuantizationType.F32
    np_type = np.dtype(np.float16 if outtype == "F16" else np.float32)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[model.arch])
    plan: list[tuple[TensorRef, bool]] = []          # (tensor, write transposed)
    for p in pairs:
        for suffix, t, shape, transposed in ((".lora_a", p.a, p.a_shape, p.embedding),
                                             (".lora_b", p.b, p.b.shape, False)):
            writer.add_tensor_info(p.name + suffix, shape, np_type, t.n_elements * np_type.itemsize, raw_dtype=qtype)
            plan.append((t, transposed))

    # Metadata in the reference's order: general.type and adapter.type, general.* from the adapter folder
    # (llama.cpp's converter reads the model card there, not in the base), alpha, quantization version.
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    add_general_metadata(writer, adapter_dir, model.folder_name)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    if config.get("alora_invocation_tokens"):
        # aLoRA: llama.cpp switches the adapter on after these tokens (uint32, as its converter writes them)
        tokens = [int(x) for x in config["alora_invocation_tokens"]]
        writer.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens,
                             gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    total = sum(t.n_elements for t, _ in plan) * np_type.itemsize
    writes = [lambda f, t=t, tr=tr: (_write_transposed if tr else write_tensor)(f, t, qtype) for t, tr in plan]
    out = write_gguf(writer, Path(out), writes, total, progress)
    log.info("wrote %s (%d LoRA pairs for %s)", out, len(pairs), model.path)
    return out
