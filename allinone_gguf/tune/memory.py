"""How much memory a LoRA training run needs, estimated before it starts (standard library only: no torch).

    from allinone_gguf.tune.memory import checkout_shape, pick_batch
    pick_batch(checkout_shape(Path(checkout)), 3.0, batch=8, prefix=120, longest=260)    # -> 8, or ValueError

The estimate is the frozen weights, the process's fixed cost (torch, transformers, peft imported) and the
activations the backward pass keeps for the longest batch. It errs high rather than low; against ru_maxrss
(2026-11-30, 2-core AMD EPYC, the longest batch run first): the stand-in Qwen2.5-Coder-0.5B checkout at batch
8, 94 + 261 tokens, estimated 2.43 GB, measured 1.91 GB (bf16 weights, checkpointing) and estimated 11.25 GB,
measured 7.50 GB over 14 steps (fp32 weights, no checkpointing; a whole run of those settings peaked at 13.0 GB);
the tiny test model 0.63 GB estimated, 0.59 GB measured.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

GB = 1024 ** 3               # every GB here, as in --max-memory and the tuner's printout, is a GiB
RUNTIME_GB = 0.55            # a trainer process with torch + transformers + peft imported and the inputs read
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
FP32_PRODUCTS_GB = 0.65       # every product in fp32 (no bf16 arithmetic): see estimate_peak_gb
# the input embeddings and the output head: the trainer reads rows of them, and keeps them bf16 under fp32 weights
ROW_TENSORS = ("embed_tokens.weight", "lm_head.weight")
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1}


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX, as /proc/cpuinfo's flags say).
    Without it torch multiplies bf16 matrices in a plain loop: a training step on the 0.5B stand-in took over
    2 minutes on an AVX2-only EPYC, against 10 s with fp32 weights (2026-12-02).

        >>> cpu_has_bf16("flags : fpu avx2 avx512f avx512_bf16"), cpu_has_bf16("flags : fpu avx2 fma")
        (True, False)
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def padded_length(tokens: int, pad_to: int) -> int:
    """A batch's input length as the trainer pads it (--pad-to): rounded up to a multiple of pad_to.

        >>> padded_length(261, 8), padded_length(256, 8), padded_length(5, 1)
        (264, 256, 5)
    """
    return -(-tokens // pad_to) * pad_to


def resolve_base_dtype(base_dtype: str, bf16_arithmetic: bool) -> str:
    """"bf16" or "fp32" for a `tune --base-dtype` (auto: bf16 where the CPU has bf16 arithmetic, else fp32);
    ValueError for anything else."""
    if base_dtype == "auto":
        return "bf16" if bf16_arithmetic else "fp32"
    if base_dtype not in DTYPE_BYTES:
        raise ValueError(f"base_dtype must be auto, bf16 or fp32, not {base_dtype}")
    return base_dtype


def safetensors_headers(checkout: Path):
    """(file, byte offset of its data, header) for each of the checkout's *.safetensors files, in name order."""
    for f in sorted(Path(checkout).glob("*.safetensors")):
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            yield f, 8 + size, json.loads(fh.read(size))


def checkout_shape(checkout: Path) -> dict:
    """The sizes the estimate needs: config.json's and the weights' element count (from the safetensors headers,
    without reading the tensors)."""
    config = json.loads((checkout / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    params = rows = 0
    for _, _, header in safetensors_headers(checkout):
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                params += n
                if name.endswith(ROW_TENSORS):
                    rows += n
    if params == 0:
        raise ValueError(f"{checkout}: no *.safetensors weights to size the training by")
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    return {"params": params, "rows": rows, "layers": config["num_hidden_layers"], "hidden": hidden,
            "intermediate": config["intermediate_size"], "heads": heads,
            "kv": config.get("num_key_value_heads", heads) * config.get("head_dim", hidden // heads)}


def weights_bytes(shape: dict, base_dtype: str) -> int:
    """The frozen weights' resident bytes. With fp32 weights the input embeddings and the output head stay bf16
    (train_lora.load_base; most of their pages are never read, but they are counted whole, as bf16)."""
    if base_dtype == "fp32":
        return shape["params"] * 4 - shape["rows"] * 2
    return shape["params"] * DTYPE_BYTES[base_dtype]


def estimate_peak_gb(shape: dict, *, batch: int, prefix: int, longest: int, base_dtype: str = "bf16",
                     checkpointing: bool = True, adapted: int = 0, bf16_arithmetic: bool = True) -> float:
    """Peak resident memory (GB) of training on `shape` with `batch` texts of `longest` tokens after a shared
    `prefix` of tokens, the LoRA on the top `adapted` layers (0: all; only those keep anything for the backward
    pass). Activations are counted at 2 bytes (bf16 autocast) plus fp32 norms and residuals. On a CPU without
    `bf16_arithmetic` every product is made in fp32 (bf16 weights upcast one at a time, or fp32 weights), whose
    fp32 activations and heap slack measured 0.5 GiB above this estimate over 12 steps (bf16 weights: 2.53
    against 2.03 GiB, 0.5B stand-in, batch 8, 2026-12-02) and a whole make tune (heap trimmed) 2.63 GiB against
    2.5 (2026-12-07): 0.65 GiB added."""
    h, i, heads = shape["hidden"], shape["intermediate"], shape["heads"]
    layers = min(adapted or shape["layers"], shape["layers"])
    weights = weights_bytes(shape, base_dtype)
    context = prefix + longest
    # bytes one token keeps for the backward pass in one decoder layer: q/k/v/o and MLP inputs and outputs
    # (bf16), the norms' and residuals' fp32 copies, the key/value heads repeated for attention
    per_token = 2 * (10 * h + 5 * i) + 4 * 4 * h
    per_text_layer = longest * per_token + 3 * 2 * heads * longest * context + 2 * 2 * h * context
    if checkpointing:
        # every layer keeps only its input; one layer at a time is recomputed, with its gradients (x2)
        activations = batch * (layers * longest * h * 2 + 2 * per_text_layer)
    else:
        activations = batch * layers * per_text_layer * 1.3        # + the gradients in flight
    prefix_pass = layers * prefix * per_token                       # batch 1, never recomputed
    slack = 0.0 if bf16_arithmetic else FP32_PRODUCTS_GB
    return round(RUNTIME_GB + slack + (weights + activations + prefix_pass) / GB, 2)


def pick_precision_and_batch(shape: dict, max_gb: float | None, *, base_dtype: str, bf16_arithmetic: bool,
                             batch: int, **sizes) -> tuple[str, int]:
    """The base weights' precision and the batch for `tune --base-dtype base_dtype --max-memory max_gb --batch batch`:
    the precision as resolve_base_dtype gives it and the largest batch that fits (pick_batch; `batch` without a
    limit). Under auto on a CPU without bf16 arithmetic fp32 weights are the faster, but where not even one text
    fits with them, bf16 weights (multiplied in fp32: half the weights' memory, 1.2x the time a step) are taken.
    ValueError (one line) when nothing fits or base_dtype is unknown."""
    dtype = resolve_base_dtype(base_dtype, bf16_arithmetic)
    if not max_gb:
        return dtype, batch
    try:
        return dtype, pick_batch(shape, max_gb, batch=batch, base_dtype=dtype, bf16_arithmetic=bf16_arithmetic,
                                 **sizes)
    except ValueError:
        if base_dtype != "auto" or dtype == "bf16":
            raise
    return "bf16", pick_batch(shape, max_gb, batch=batch, base_dtype="bf16", bf16_arithmetic=bf16_arithmetic, **sizes)


def pick_batch(shape: dict, max_gb: float, *, batch: int, prefix: int, longest: int, base_dtype: str = "bf16",
               checkpointing: bool = True, adapted: int = 0, bf16_arithmetic: bool = True) -> int:
    """The largest batch <= `batch` whose estimate fits in `max_gb`; ValueError (one line) when not even 1 does."""
    for b in range(batch, 0, -1):
        if estimate_peak_gb(shape, batch=b, prefix=prefix, longest=longest, base_dtype=base_dtype,
                            checkpointing=checkpointing, adapted=adapted, bf16_arithmetic=bf16_arithmetic) <= max_gb:
            return b
    need = estimate_peak_gb(shape, batch=1, prefix=prefix, longest=longest, base_dtype=base_dtype,
                            checkpointing=checkpointing, adapted=adapted, bf16_arithmetic=bf16_arithmetic)
    weights = weights_bytes(shape, base_dtype) / GB
    raise ValueError(f"training needs about {need:.1f} GiB even one text at a time ({weights:.1f} GiB of {base_dtype} "
                     f"weights, inputs up to {prefix + longest} tokens); --max-memory is {max_gb:g} GiB: raise it, "
                     f"or lower --max-tokens" + ("" if base_dtype == "bf16" else ", or use --base-dtype bf16")
                     + ("" if checkpointing else ", or drop --no-checkpointing"))
