"""Train the sentiment LoRA with PEFT on torch: run only by `python -m allinone_gguf tune`, inside .venv-tune.

    .venv-tune/bin/python allinone_gguf/tune/train_lora.py --checkout DIR --inputs inputs.jsonl --out ADAPTER_DIR

This file is the only one that imports torch, and nothing in the product imports it. It reads the exact token
ids the runtime decodes (inputs.jsonl, written by tune/run.py from `AllInOne.sentiment_inputs`): a header
{"prefix": [...], "label_ids": [[positive first tokens], [negative first tokens]]} and one row per text
{"rest": [...], "label": 1 | 0, "split": "train" | "held"}; every text's input is prefix + rest.

Loss: the runtime's own answer, log P(positive) - log P(negative) over the grammar's first tokens at the last
position, as a two-way cross-entropy on the true label: the label token only. The fixed prefix (system prompt)
is decoded once per batch and its keys/values shared by the batch's texts (gradients still flow through it),
which is exact for a causal model and about twice as fast as decoding it per text (`--self-check` proves it).
The held texts choose the best checkpoint (lowest loss); Ctrl-C stops after the current step and saves it.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM


def read_inputs(path: Path):
    with path.open(encoding="utf-8") as f:
        head = json.loads(f.readline())
        rows = [json.loads(line) for line in f if line.strip()]
    return head, rows


class Scorer:
    """Margins log P(pos) - log P(neg) for texts that share one prefix, on a (PEFT-wrapped) causal LM."""

    def __init__(self, model, prefix: list[int], label_ids: list[list[int]], bf16: bool = False):
        self.model, self.prefix, self.bf16 = model, prefix, bf16
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body, self.head = inner.model, inner.lm_head
        self.pos, self.neg = (torch.tensor(ids) for ids in label_ids)

    def _margins(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.head.weight
        lp = torch.logsumexp(hidden @ w[self.pos].T, dim=-1)
        ln = torch.logsumexp(hidden @ w[self.neg].T, dim=-1)
        return lp - ln

    def margins(self, rests: list[list[int]]) -> torch.Tensor:
        """Prefix decoded once, its cache broadcast over the batch, then the rests (right-padded)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self._shared(rests).float()

    def _shared(self, rests: list[list[int]]) -> torch.Tensor:
        n, longest = len(rests), max(len(r) for r in rests)
        out = self.body(input_ids=torch.tensor([self.prefix]), use_cache=True)
        cache = out.past_key_values
        for layer in cache.layers:
            layer.keys = layer.keys.expand(n, -1, -1, -1)
            layer.values = layer.values.expand(n, -1, -1, -1)
        ids = torch.zeros((n, longest), dtype=torch.long)
        mask = torch.zeros((n, len(self.prefix) + longest), dtype=torch.long)
        mask[:, :len(self.prefix)] = 1
        for i, r in enumerate(rests):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, len(self.prefix):len(self.prefix) + len(r)] = 1
        h = self.body(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
        last = h[torch.arange(n), torch.tensor([len(r) - 1 for r in rests])]
        return self._margins(last)

    def margins_whole(self, rests: list[list[int]]) -> torch.Tensor:
        """The same, one text at a time with the prefix decoded for each (the slow, obvious way)."""
        rows = []
        for r in rests:
            h = self.body(input_ids=torch.tensor([self.prefix + r])).last_hidden_state
            rows.append(self._margins(h[0, -1:])[0])
        return torch.stack(rows)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def batches(rows: list[dict], size: int, rng: random.Random) -> list[list[dict]]:
    """Batches of texts of similar length (less padding), in random order."""
    order = sorted(rows, key=lambda r: (len(r["rest"]), rng.random()))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", required=True, help="Hugging Face checkout of the model")
    p.add_argument("--inputs", required=True, help="inputs.jsonl written by tune/run.py")
    p.add_argument("--out", required=True, help="folder for the PEFT adapter (adapter_model.safetensors)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations during training (best one kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast (fp32 master weights) is ~2.6x faster on CPUs with AVX512-BF16/AMX; "
                        "auto uses it when /proc/cpuinfo lists them")
    p.add_argument("--self-check", action="store_true",
                   help="compare the shared-prefix margins with whole-text ones on a few texts and exit")
    a = p.parse_args(argv)

    bf16 = a.precision == "bf16" or (a.precision == "auto" and cpu_has_bf16())
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    head, rows = read_inputs(Path(a.inputs))
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "held"]
    model = AutoModelForCausalLM.from_pretrained(a.checkout, dtype=torch.float32)
    config = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets.split(","),
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    scorer = Scorer(model, head["prefix"], head["label_ids"], bf16)

    if a.self_check:
        # A trained adapter must be checked, not a zero one: move lora_B off zero first.
        with torch.no_grad():
            for name, t in model.named_parameters():
                if "lora_B" in name:
                    t.normal_(0, 0.005)
        model.eval()
        sample = [r["rest"] for r in rows[:6]]
        with torch.no_grad():
            shared, whole = scorer.margins(sample), scorer.margins_whole(sample)
        diff = float((shared - whole).abs().max())
        print(json.dumps({"max_abs_diff": diff, "shared": shared.tolist(), "whole": whole.tolist()}))
        return 0 if diff < 1e-3 else 1

    params = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    plan = []
    for epoch in range(math.ceil(a.epochs)):
        plan += batches(train, a.batch, rng)
    plan = plan[:max(1, round(len(plan) * a.epochs / math.ceil(a.epochs)))]
    total = len(plan)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / max(1, total - warmup)))
    checks = {round(total * k / a.evals) for k in range(1, a.evals + 1)} if held else set()

    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print("\ninterrupted: finishing this step, then saving the best checkpoint so far "
              "(Ctrl-C again to abandon)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, on_sigint)

    log = {"train_texts": len(train), "held_texts": len(held), "steps_planned": total, "evals": [],
           "precision": "bf16" if bf16 else "fp32",
           "interrupted": False}
    best = None
    start = time.perf_counter()
    model.train()
    bar = tqdm(plan, desc="tune", unit="batch", file=sys.stderr, dynamic_ncols=True)
    running = None
    step = 0
    for step, batch in enumerate(bar, 1):
        margins = scorer.margins([r["rest"] for r in batch])
        loss = loss_of(margins, torch.tensor([r["label"] for r in batch], dtype=torch.float32))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.3f}")
        if step in checks or stop["asked"]:
            result = {"step": step, **evaluate(scorer, held, a.batch * 2),
                      "seconds": round(time.perf_counter() - start, 1)}
            log["evals"].append(result)
            tqdm.write(f"step {step}/{total}: held-back loss {result['loss']:.4f}, accuracy "
                       f"{result['accuracy']:.3f}", file=sys.stderr)
            if best is None or result["loss"] < best[0]["loss"]:
                best = (result, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k})
        if stop["asked"]:
            log["interrupted"] = True
            break
    bar.close()
    log["steps"] = step
    log["seconds"] = round(time.perf_counter() - start, 1)
    if best is not None:
        model.load_state_dict(best[1], strict=False)
        log["best"] = best[0]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    return 130 if log["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
