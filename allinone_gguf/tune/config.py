"""The tune command's knobs, written once (standard library only, so `tune --help` loads nothing heavy)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TuneSettings:
    """Every knob of `tune`, with its default written once (the CLI's flags come from these fields)."""

    # 600 texts a file, inputs cut to 64 tokens: within 0.03 of 1,200 full-length texts on every dev file, half the
    # steps, trainer peak 2.8 GB instead of 4.5 (docs/adapter.md, the learning curve: make tune-grid).
    texts: int = field(default=600, metadata={"help": "training texts taken from each --data file"})
    held: int = field(default=40, metadata={
        "help": "texts held back from each --data file: they choose the checkpoint and fit the temperature"})
    inject: float = field(default=0.25, metadata={
        "help": "share of training texts that also get a copy with an injected instruction (true label kept)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training texts"})
    rank: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    targets: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={
        "help": "modules the LoRA adapts, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)"})
    layers: int = field(default=0, metadata={
        "help": "decoder layers the LoRA adapts, counted from the top (0: all): the backward pass stops at the "
                "lowest one, so fewer layers train faster"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW, warm-up then linear decay)"})
    batch: int = field(default=8, metadata={"help": "texts per training step"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling, the injections and the training"})
    prompt: str = field(default="guide", metadata={
        "help": "sentiment prompt variant the adapter is trained in (and the runtime then uses with it)"})
    labels: str = field(default="zh", metadata={"help": "label language the adapter answers in"})
    max_tokens: int | None = field(default=64, metadata={
        "help": "text tokens per training input, head and tail kept as the runtime cuts them (0: the runtime's "
                "sentiment_tokens)"})
    pad_to: int = field(default=8, metadata={
        "help": "pad each training batch to a multiple of this many tokens (1: to its longest text): a few tensor "
                "shapes instead of one per length, so the heap fragments less (a whole run on the stand-in: peak "
                "2.28 GiB instead of 2.97, a step about 1.07× as long; docs/adapter.md)"})
    base_dtype: str = field(default="auto", metadata={
        "help": "precision the frozen base weights are kept in while training: bf16 (half the memory; on a CPU "
                "without AVX512-BF16 or AMX multiplied in fp32: 2.5 GiB instead of 3.9 for 1.2x the time a step "
                "on the 0.5B stand-in), fp32, or auto: bf16 where the CPU has those, else fp32 unless "
                "--max-memory leaves room only for bf16 (the LoRA and its optimizer stay fp32)"})
    checkpointing: bool = field(default=True, metadata={
        "help": "gradient checkpointing: keep each layer's input only and recompute the layer in the backward "
                "pass (on the 0.5B stand-in with fp32 weights: 3.9 GiB instead of 5.4, for 1.2x the time a step)"})
    max_memory: float | None = field(default=None, metadata={
        "help": "GiB (2**30 bytes) the training may use: the batch is lowered until the estimate fits, and under "
                "--base-dtype auto fp32 weights give way to bf16 ones when not even one text fits with them (an "
                "error if nothing fits)"})
    resume: bool = field(default=False, metadata={
        "help": "continue an interrupted run from the last checkpoint in --work (same data and settings): it "
                "ends with the adapter the uninterrupted run would have written"})
