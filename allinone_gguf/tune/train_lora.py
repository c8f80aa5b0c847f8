"""Train the sentiment LoRA with PEFT on torch: run only by `python -m allinone_gguf tune`, inside .venv-tune.

    .venv-tune/bin/python allinone_gguf/tune/train_lora.py --checkout DIR --inputs inputs.jsonl --out ADAPTER_DIR

This file and products.py (the measurement of a step's arithmetic) are the tuner's only ones that import torch,
and nothing in the product imports them. It reads the exact token ids the runtime decodes (inputs.jsonl, written
by tune/run.py from `AllInOne.sentiment_inputs`): a header
{"prefix": [...], "label_ids": [[positive first tokens], [negative first tokens]]} and one row per text
{"rest": [...], "label": 1 | 0, "split": "train" | "held"}; every text's input is prefix + rest.

Loss: the runtime's own answer, log P(positive) - log P(negative) over the grammar's first tokens at the last
position, as a two-way cross-entropy on the true label: the label token only. The fixed prefix (system prompt)
is decoded once per batch and its keys/values shared by the batch's texts (gradients still flow through it),
which is exact for a causal model and about twice as fast as decoding it per text (`--self-check` proves it).
The held texts choose the best checkpoint (lowest loss).

Memory: the frozen base weights stay in bf16 (--base-dtype), the LoRA and AdamW in fp32; fp32 base weights (the
faster on a CPU without bf16 arithmetic) are read tensor by tensor, the embeddings and the head left bf16 in the
mapped file (load_base). With gradient checkpointing each decoder layer keeps only its input and is recomputed in
the backward pass (the prefix's keys/values are read, never appended to, so a layer is a pure function of its
input). With --layers N only the top N layers carry the LoRA: the layers below run forward once, keep nothing and
get no backward pass. After each step and check the heap's free pages go back to the system wherever the products
are made in fp32, without bf16 autocast (--trim, glibc's malloc_trim): their fp32 tensors come in many sizes, and
the holes they leave otherwise stay resident and add up over a run. The end of the run prints the peak resident
memory (ru_maxrss) and the time.

Interruptions: at each evaluation point the whole training state (LoRA, optimizer, schedule, RNG, the batch
order, the best checkpoint so far) goes to checkpoint.pt in --out, written atomically (temporary file, then
os.replace). Ctrl-C or SIGTERM stops after the current step, saves that state and the best adapter so far,
and exits with status 130; --resume continues from checkpoint.pt and ends with the same adapter as an
uninterrupted run with the same seed (the evaluation made only because of the interruption is not a candidate).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # run as a script: the project's root
from allinone_gguf.tune.memory import cpu_has_bf16, padded_length, safetensors_headers  # noqa: E402  (no torch)


def heap_trimmer():
    """glibc's malloc_trim(0) as a function of no arguments, or None where the C library has none (musl, macOS).
    It hands the pages of the heap's free chunks back to the system: the tensors of a step come in many sizes,
    and the holes they leave stay resident until trimmed."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def read_inputs(path: Path):
    with path.open(encoding="utf-8") as f:
        head = json.loads(f.readline())
        rows = [json.loads(line) for line in f if line.strip()]
    return head, rows


class Scorer:
    """Margins log P(pos) - log P(neg) for texts that share one prefix, on a (PEFT-wrapped) causal LM."""

    def __init__(self, model, prefix: list[int], label_ids: list[list[int]], bf16: bool = False,
                 checkpointing: bool = False, pad_to: int = 1, lowest: int = 0):
        self.model, self.prefix, self.bf16, self.pad_to = model, prefix, bf16, pad_to
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body, self.head = inner.model, inner.lm_head
        self.pos, self.neg = (torch.tensor(ids) for ids in label_ids)
        self.recompute = False          # True while the rests are decoded (the prefix pass is kept whole)
        if checkpointing:       # the layers below `lowest` hold no LoRA: no gradient reaches them, nothing to keep
            for layer in self.body.layers[lowest:]:
                layer.forward = self._checkpointed(layer.forward)

    def _checkpointed(self, forward):
        def run(*args, **kwargs):
            if self.recompute and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)
        return run

    def _margins(self, hidden: torch.Tensor) -> torch.Tensor:
        """In fp32 whatever the weights' precision: the loss reads small differences of these."""
        h, w = hidden.float(), self.head.weight
        lp = torch.logsumexp(h @ w[self.pos].float().T, dim=-1)
        ln = torch.logsumexp(h @ w[self.neg].float().T, dim=-1)
        return lp - ln

    def margins(self, rests: list[list[int]]) -> torch.Tensor:
        """Prefix decoded once, its cache broadcast over the batch, then the rests (right-padded)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self._shared(rests).float()

    def _shared(self, rests: list[list[int]]) -> torch.Tensor:
        n, longest = len(rests), max(len(r) for r in rests)
        longest = padded_length(longest, self.pad_to)     # a few shapes, not one per length: see --pad-to
        out = self.body(input_ids=torch.tensor([self.prefix]), use_cache=True)
        cache = out.past_key_values
        for layer in cache.layers:
            layer.keys = layer.keys.expand(n, -1, -1, -1)
            layer.values = layer.values.expand(n, -1, -1, -1)
            layer.update = read_only(layer)
        ids = torch.zeros((n, longest), dtype=torch.long)
        mask = torch.zeros((n, len(self.prefix) + longest), dtype=torch.long)
        mask[:, :len(self.prefix)] = 1
        for i, r in enumerate(rests):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, len(self.prefix):len(self.prefix) + len(r)] = 1
        self.recompute = True
        try:
            h = self.body(input_ids=ids, attention_mask=mask, past_key_values=cache,
                          use_cache=True).last_hidden_state
        finally:
            self.recompute = False
        last = h[torch.arange(n), torch.tensor([len(r) - 1 for r in rests])]
        return self._margins(last)

    def margins_whole(self, rests: list[list[int]]) -> torch.Tensor:
        """The same, one text at a time with the prefix decoded for each (the slow, obvious way)."""
        rows = []
        for r in rests:
            h = self.body(input_ids=torch.tensor([self.prefix + r])).last_hidden_state
            rows.append(self._margins(h[0, -1:])[0])
        return torch.stack(rows)


def read_only(layer):
    """A cache layer's update that returns prefix + new keys/values without storing them: decoding the rests
    leaves the prefix cache as it was, so a checkpointed layer recomputes exactly what it computed."""
    def update(keys, values, cache_kwargs=None):
        return torch.cat([layer.keys, keys], dim=-2), torch.cat([layer.values, values], dim=-2)
    return update


class Fp32Linear(torch.autograd.Function):
    """x @ W.T + b for a frozen bf16 W, multiplied in fp32, so the weights keep bf16's memory on a CPU without bf16
    arithmetic. W is copied into one fp32 buffer per weight shape (fp32_copy), reused by every product: a fresh
    copy per product (up to 17 MB on the 0.5B model, thousands a step) fragmented the heap to 3.49 GiB peak."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, fp32_copy(weight), None if bias is None else bias.float())

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ fp32_copy(weight), None, None


_FP32_BUFFERS: dict[tuple, torch.Tensor] = {}


def fp32_copy(weight: torch.Tensor) -> torch.Tensor:
    """weight in fp32, in the buffer kept for its shape: valid until the next call for that shape (each product
    uses it at once, one after the other)."""
    buffer = _FP32_BUFFERS.get(weight.shape)
    if buffer is None:
        buffer = _FP32_BUFFERS[weight.shape] = torch.empty(weight.shape, dtype=torch.float32)
    return buffer.copy_(weight)


def frozen_bf16_linears(model) -> list:
    """The model's Linear modules whose weights are bf16 and not trained: the ones compute_in_fp32 reroutes."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16
            and not m.weight.requires_grad]


def compute_in_fp32(model) -> None:
    """Run a model whose frozen weights are bf16 in fp32: the embeddings' output is cast up and every frozen
    Linear multiplies through Fp32Linear (norms promote by themselves: a bf16 weight times fp32 is fp32)."""
    for module in frozen_bf16_linears(model):
        module.forward = (lambda m: lambda x: Fp32Linear.apply(x, m.weight, m.bias))(module)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.float())


def batches(rows: list[dict], size: int, rng: random.Random) -> list[list[int]]:
    """Batches (indices into `rows`) of texts of similar length (less padding), in random order."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["rest"]), rng.random()))
    out = [order[i:i + size] for i in range(0, len(order), size)]
    rng.shuffle(out)
    return out


def loss_of(margins: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the two-way answer: -log sigmoid(+margin) for positives, -log sigmoid(-margin) else."""
    return torch.nn.functional.softplus(-(2 * labels - 1) * margins).mean()


@torch.no_grad()
def evaluate(scorer: Scorer, rows: list[dict], size: int) -> dict:
    scorer.model.eval()
    margins, labels = [], []
    for i in range(0, len(rows), size):
        part = rows[i:i + size]
        margins.append(scorer.margins([r["rest"] for r in part]))
        labels += [r["label"] for r in part]
    m, y = torch.cat(margins), torch.tensor(labels, dtype=torch.float32)
    scorer.model.train()
    return {"loss": float(loss_of(m, y)), "accuracy": float(((m > 0).float() == y).float().mean()), "n": len(rows)}


def lora_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def write_atomic(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, flushed to disk, then renamed over `path`: a reader
    (or a resumed run) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(model, out: Path) -> None:
    """save_pretrained into a scratch folder, then each file renamed into `out` (atomic per file)."""
    scratch = out / ".saving"
    model.save_pretrained(scratch, safe_serialization=True)
    for f in scratch.iterdir():
        os.replace(f, out / f.name)
    scratch.rmdir()


def fingerprint(a, bf16: bool) -> dict:
    """What a checkpoint must share with the run that resumes it to end with the same adapter."""
    digest = hashlib.sha256(Path(a.inputs).read_bytes()).hexdigest()
    return {"inputs_sha256": digest, "checkout": str(Path(a.checkout).resolve()), "rank": a.rank,
            "alpha": a.alpha, "targets": a.targets, "epochs": a.epochs, "lr": a.lr, "batch": a.batch,
            "evals": a.evals, "seed": a.seed, "base_dtype": a.base_dtype, "checkpointing": a.checkpointing,
            "autocast_bf16": bf16, "longest_first": a.longest_first, "pad_to": a.pad_to, "layers": a.layers,
            "attention": a.attention}


def safetensors_index(checkout: str) -> dict[str, tuple[Path, int, str, list[int]]]:
    """{tensor name: (file, byte offset, safetensors dtype, shape)} over the checkout's *.safetensors files."""
    return {name: (f, start + t["data_offsets"][0], t["dtype"], t["shape"])
            for f, start, header in safetensors_headers(checkout) for name, t in header.items()
            if name != "__metadata__"}


def read_tensor(path: Path, offset: int, shape: list[int]) -> torch.Tensor:
    """One bf16 tensor of a safetensors file, read with plain reads into fresh memory (not through a mapping)."""
    t = torch.empty(shape, dtype=torch.bfloat16)
    with path.open("rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(t.view(torch.int16).numpy()).cast("B")) != t.numel() * 2:
            raise ValueError(f"{path}: shorter than its header says")
    return t


def load_base(checkout: str, config, dtype: torch.dtype, attention: str):
    """The checkout's model with its frozen weights in `dtype`. fp32 weights from a bf16 checkout (Qwen's own) are
    made tensor by tensor: the model is loaded in bf16, which maps the file without copying it, and each weight is
    then read from the file with plain reads and upcast, so the mapping's pages are never touched. The input
    embeddings and the output head stay bf16 in the mapping: the trainer looks rows up in one and multiplies two
    rows of the other, in fp32 (Scorer._margins and the hook below), and only those rows' pages become resident.
    Loading in fp32 at once held the fp32 weights and the whole mapped file: 3.84 GiB at its peak and 2.67 after
    on the 0.5B stand-in (its head untied), against 1.69 after this (2026-12-07). bf16 to fp32 is exact: the
    weights are the same numbers either way."""
    index = safetensors_index(checkout) if dtype == torch.float32 else {}
    if not index or any(d != "BF16" for _, _, d, _ in index.values()):
        return AutoModelForCausalLM.from_pretrained(checkout, config=config, dtype=dtype,
                                                    attn_implementation=attention)
    model = AutoModelForCausalLM.from_pretrained(checkout, config=config, dtype=torch.bfloat16,
                                                 attn_implementation=attention)
    rows = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for name, p in model.named_parameters():
        if id(p) not in rows:
            found = index.get(name)
            p.data = read_tensor(found[0], found[1], found[3]).float() if found else p.data.float()
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.float())
    return model


def checkout_config(checkout: str):
    """The checkout's config as the runtime's GGUF has it. transformers 5 writes the RoPE base as
    rope_parameters.rope_theta, which the pinned 4.x does not read: it would train at its default base of 10,000
    a model that runs at 1,000,000 (Qwen2.5), and the adapter would learn on other attention than it serves."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(checkout)
    raw = json.loads((Path(checkout) / "config.json").read_text(encoding="utf-8"))
    theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None and getattr(config, "rope_theta", theta) != theta:
        print(f"config.json gives the RoPE base as rope_parameters: using {theta} (transformers read "
              f"{config.rope_theta})", file=sys.stderr, flush=True)
        config.rope_theta = float(theta)
    return config


def main(argv=None) -> int:
    stop = {"asked": False}

    def on_signal(signum, frame):
        if signum == signal.SIGINT and stop["asked"]:
            raise KeyboardInterrupt
        if not stop["asked"]:       # a repeated SIGTERM (from `tune` and from a process group's kill) is one
            stop["asked"] = True
            print(f"\n{'interrupted' if signum == signal.SIGINT else 'SIGTERM'}: finishing this step, then saving "
                  "a checkpoint and the best adapter so far (Ctrl-C again to abandon)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", required=True, help="Hugging Face checkout of the model")
    p.add_argument("--inputs", required=True, help="inputs.jsonl written by tune/run.py")
    p.add_argument("--out", required=True, help="folder for the PEFT adapter (adapter_model.safetensors)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--layers", type=int, default=0, metavar="N",
                   help="adapt the top N decoder layers only (0: all): the backward pass stops at the lowest one")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--evals", type=int, default=4,
                   help="held-out evaluations during training (best one kept; a checkpoint at each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast is ~2.6x faster on CPUs with AVX512-BF16/AMX; auto uses it when "
                        "/proc/cpuinfo lists them")
    p.add_argument("--base-dtype", choices=("bf16", "fp32"), default="bf16",
                   help="precision of the frozen base weights (the LoRA and AdamW stay fp32)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing: recompute each decoder layer in the backward pass")
    p.add_argument("--pad-to", type=int, default=1, metavar="TOKENS",
                   help="pad each batch's texts to a multiple of this many tokens (1: to the batch's longest; "
                        "tune passes its own default). Padding after the last token changes no margin; fewer "
                        "distinct shapes fragment the heap less")
    p.add_argument("--attention", choices=["eager", "sdpa"], default="eager",
                   help="transformers' attention: eager (matmul + softmax) or sdpa (torch's fused kernel, whose CPU "
                        "backward in bf16 measured 3.6x eager's time a layer on these short inputs)")
    p.add_argument("--trim", action=argparse.BooleanOptionalAction, default=None,
                   help="hand the heap's free pages back to the system after each step and check (glibc's "
                        "malloc_trim); default: where the products are made in fp32, without bf16 arithmetic (the "
                        "0.5B stand-in on an AVX2 CPU, 75 steps: 2.58 GiB peak against 3.62 untrimmed with bf16 "
                        "weights, 2.92 with fp32 ones against 3.42 by step 40; the same held-back losses; up to "
                        "1.17x the time), not elsewhere (bf16 arithmetic: no gain over 40 steps, 2026-12-01)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.pt in --out")
    p.add_argument("--stop-after", type=int, metavar="STEPS",
                   help="measurement: stop after this many steps, as if interrupted")
    p.add_argument("--longest-first", action="store_true",
                   help="measurement: move the batch of the longest texts to the front, so a capped run meets "
                        "the peak memory")
    p.add_argument("--self-check", action="store_true",
                   help="compare the shared-prefix margins and gradients with whole-text ones on a few texts "
                        "and exit")
    a = p.parse_args(argv)
    if a.pad_to < 1:
        p.error("--pad-to must be 1 or more")
    if a.layers < 0:
        p.error("--layers must be 0 (all) or more")

    bf16 = a.precision == "bf16" or (a.precision == "auto" and cpu_has_bf16())
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    head, rows = read_inputs(Path(a.inputs))
    train = [r for r in rows if r["split"] == "train"]
    # shortest first: each evaluation batch is padded to its longest text only (37 % fewer tokens to read on
    # make tune's 240 held-back texts than in file order)
    held = sorted((r for r in rows if r["split"] == "held"), key=lambda r: len(r["rest"]))
    dtype = torch.bfloat16 if a.base_dtype == "bf16" else torch.float32
    model = load_base(a.checkout, checkout_config(a.checkout), dtype, a.attention)
    n_layers = model.config.num_hidden_layers
    lowest = n_layers - min(a.layers or n_layers, n_layers)
    config = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets.split(","),
                        layers_to_transform=list(range(lowest, n_layers)) if lowest else None, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)        # the LoRA's weights in fp32 (autocast_adapter_dtype)
    if dtype == torch.bfloat16 and not bf16:
        compute_in_fp32(model)      # bf16 arithmetic without AVX512-BF16/AMX: minutes a step instead of seconds
    scorer = Scorer(model, head["prefix"], head["label_ids"], bf16, a.checkpointing, a.pad_to, lowest)

    if a.self_check:
        return self_check(model, scorer, rows)

    params = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    order = []
    for epoch in range(math.ceil(a.epochs)):
        order += batches(train, a.batch, rng)
    order = order[:max(1, round(len(order) * a.epochs / math.ceil(a.epochs)))]
    if a.longest_first:
        j = max(range(len(order)), key=lambda k: max(len(train[i]["rest"]) for i in order[k]))
        order.insert(0, order.pop(j))
    total = len(order)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / max(1, total - warmup)))
    checks = {round(total * k / a.evals) for k in range(1, a.evals + 1)} if held else set()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    mark = fingerprint(a, bf16)
    log = {"train_texts": len(train), "held_texts": len(held), "steps_planned": total, "evals": [],
           "precision": "bf16" if bf16 else "fp32", "base_dtype": a.base_dtype, "checkpointing": a.checkpointing,
           "batch": a.batch, "pad_to": a.pad_to, "adapted_layers": n_layers - lowest, "interrupted": False}
    best, first, spent, running = None, 0, 0.0, None
    if a.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        differ = [k for k in mark if state["fingerprint"].get(k) != mark[k]]
        if differ:
            print(f"error: {checkpoint} belongs to another run (it differs in {', '.join(differ)}); run without "
                  "--resume to start over", file=sys.stderr)
            return 2
        model.load_state_dict(state["lora"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        rng.setstate(state["python_rng"])
        order, first, best = state["order"], state["step"], state["best"]
        log["evals"], spent, running = state["evals"], state["seconds"], state["running"]
        log["resumed_from"] = first
        print(f"resuming at step {first}/{total} from {checkpoint}", file=sys.stderr, flush=True)
    elif a.resume:
        print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr, flush=True)

    def save_checkpoint(step: int) -> None:
        state = {"fingerprint": mark, "step": step, "lora": lora_state(model), "optimizer": optimizer.state_dict(),
                 "scheduler": schedule.state_dict(), "torch_rng": torch.get_rng_state(),
                 "python_rng": rng.getstate(), "order": order, "best": best, "evals": log["evals"],
                 "seconds": spent + time.perf_counter() - start, "running": running}
        write_atomic(checkpoint, lambda f: torch.save(state, f))

    trim = heap_trimmer() if (not bf16 if a.trim is None else a.trim) else None
    log["trim"] = trim is not None
    start = time.perf_counter()
    step_seconds = 0.0
    stopped_at = None           # (result, LoRA) of the evaluation made only because the run was stopped
    model.train()
    bar = tqdm(total=total, initial=first, desc="tune", unit="batch", file=sys.stderr, dynamic_ncols=True)
    step = first
    for step in range(first + 1, total + 1):
        batch = [train[i] for i in order[step - 1]]
        began = time.perf_counter()
        margins = scorer.margins([r["rest"] for r in batch])
        loss = loss_of(margins, torch.tensor([r["label"] for r in batch], dtype=torch.float32))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if trim:
            trim()
        step_seconds += time.perf_counter() - began
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        if step == a.stop_after:
            stop["asked"] = True
        if step in checks or stop["asked"]:
            result = {"step": step, **evaluate(scorer, held, a.batch * 2),
                      "seconds": round(spent + time.perf_counter() - start, 1)} if held else None
            if step in checks:
                log["evals"].append(result)
                if best is None or result["loss"] < best[0]["loss"]:
                    best = (result, lora_state(model))
            elif result is not None:
                stopped_at = (result, lora_state(model))
            save_checkpoint(step)
            if trim:
                trim()
            if result is not None:
                tqdm.write(f"step {step}/{total}: held-back loss {result['loss']:.4f}, accuracy "
                           f"{result['accuracy']:.3f}; checkpoint saved", file=sys.stderr)
        if stop["asked"]:
            log["interrupted"] = True
            break
    bar.close()
    log["steps"] = step
    log["seconds"] = round(spent + time.perf_counter() - start, 1)
    ran = step - first
    log["seconds_per_step"] = round(step_seconds / ran, 3) if ran else None
    if stopped_at is not None and (best is None or stopped_at[0]["loss"] < best[0]["loss"]):
        best = stopped_at
    if best is not None:
        model.load_state_dict(best[1], strict=False)
        log["best"] = best[0]
    log["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    save_adapter(model, out)
    text = json.dumps(log, indent=2) + "\n"
    write_atomic(out / "train_log.json", lambda f: f.write(text.encode("utf-8")))
    print(f"training: {ran} steps in {(time.perf_counter() - start) / 60:.1f} min"
          + (f" ({log['seconds_per_step']:.2f} s/step)" if ran else "")
          + f", peak memory {log['peak_rss_mb'] / 1024:.2f} GiB (ru_maxrss)"
          + (f"; stopped at step {step}/{total}: --resume continues" if log["interrupted"] else ""),
          file=sys.stderr, flush=True)
    return 130 if log["interrupted"] else 0


def self_check(model, scorer: Scorer, rows: list[dict]) -> int:
    """Shared-prefix margins and their gradients (checkpointed when asked) against whole-text ones."""
    # A trained adapter must be checked, not a zero one: move lora_B off zero first.
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "lora_B" in name:
                t.normal_(0, 0.005)
    model.eval()
    sample = [r["rest"] for r in rows[:6]]
    labels = torch.tensor([r["label"] for r in rows[:6]], dtype=torch.float32)
    params = [t for t in model.parameters() if t.requires_grad]
    found = []
    for margins_of in (scorer.margins, scorer.margins_whole):
        model.zero_grad()
        m = margins_of(sample)
        loss_of(m, labels).backward()
        found.append((m.detach(), torch.cat([t.grad.flatten() for t in params])))
    (shared, g_shared), (whole, g_whole) = found
    diff = float((shared - whole).abs().max())
    grad_diff = float((g_shared - g_whole).abs().max() / g_whole.abs().max())
    adapted = sorted({int(name.split(".layers.")[1].split(".")[0]) for name, t in model.named_parameters()
                      if t.requires_grad and ".layers." in name})
    # a frozen bf16 Linear run in fp32 (compute_in_fp32) against the plain product with an fp32 copy of its weights
    upcast = None
    linear = next((m for m in frozen_bf16_linears(model) if m.bias is not None), None)
    if linear is not None and "forward" in vars(linear):
        x = torch.randn(3, linear.in_features, requires_grad=True)
        r = torch.randn(3, linear.out_features)
        found = []
        for f in (linear, lambda v: torch.nn.functional.linear(v, linear.weight.float(), linear.bias.float())):
            x.grad = None
            y = f(x)
            (y * r).sum().backward()
            found.append((y.detach(), x.grad.clone()))
        upcast = max(float((a - b).abs().max()) for a, b in zip(*found))
    print(json.dumps({"max_abs_diff": diff, "grad_rel_diff": grad_diff, "shared": shared.tolist(),
                      "whole": whole.tolist(), "adapted_layers": adapted, "fp32_linear_diff": upcast}))
    return 0 if diff < 1e-3 and grad_diff < 1e-2 and (upcast or 0) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
