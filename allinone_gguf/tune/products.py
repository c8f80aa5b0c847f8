"""How fast this CPU multiplies a checkout's matrices: the arithmetic a tuning step is made of, in fp32, bf16 and
int8, at the shapes of one decoder layer. Run inside .venv-tune (it imports torch; the product never does):

    .venv-tune/bin/python allinone_gguf/tune/products.py --checkout ~/.cache/qwen-proxy/qwen-proxy-0.5b-chat-hf

A training step of `make tune` is about three passes of these products through every layer (forward, the
checkpointed layer's recomputation, the backward pass's input gradients; frozen weights get no weight gradients)
over the batch's tokens: 8 texts of ~42 tokens after a 94-token prefix, ~430 rows (--rows). So "a pass" below,
times three, is a floor under a step's time on this CPU, whatever the code around the products does.

bf16 is what `--base-dtype bf16` multiplies in on a CPU with AVX512-BF16 or AMX; elsewhere torch's plain loop does
bf16, many times slower, so the trainer multiplies bf16 weights in fp32 there (train_lora.py's Fp32Linear).
int8 is torch's dynamic quantized Linear (fbgemm: int8 weights per output channel, activations quantized per
call), which the trainer does not use: it is measured here to show what it would buy, with its error against the
fp32 product.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # run as a script: the project's root
from allinone_gguf.tune.memory import checkout_shape, cpu_has_bf16  # noqa: E402  (standard library only)

PRECISIONS = ("fp32", "bf16", "int8")


def layer_products(shape: dict) -> list[tuple[str, int, int, int]]:
    """(name, inputs, outputs, count) of one decoder layer's matrix products: q and o, k and v, gate and up, down."""
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    return [("q_proj, o_proj", h, h, 2), ("k_proj, v_proj", h, kv, 2), ("gate_proj, up_proj", h, i, 2),
            ("down_proj", i, h, 1)]


def product(precision: str, weight: torch.Tensor):
    """A function x -> x @ weight.T in `precision` (fp32 in, fp32 out), its weight prepared once."""
    if precision == "fp32":
        return lambda x: torch.nn.functional.linear(x, weight)
    if precision == "bf16":
        w16 = weight.bfloat16()
        return lambda x: torch.nn.functional.linear(x.bfloat16(), w16).float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    with warnings.catch_warnings():          # torch 2.13 deprecates quantized tensors; this is a measurement only
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        linear = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0], bias_=False)
        linear.set_weight_bias(q, None)
    return linear


def seconds(f, x: torch.Tensor, repeat: int) -> float:
    """The best of `repeat` timings of f(x), after one untimed call (first-call allocations left out)."""
    f(x)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f(x)
        best = min(best, time.perf_counter() - t)
    return best


def measure(shape: dict, rows: int, repeat: int) -> dict:
    """Each product of one layer in each precision on random (rows x in) inputs and weights scaled like a trained
    layer's: best time, GFLOPS and relative error against fp32; pass_seconds sums them over all layers."""
    torch.manual_seed(0)
    out = {"rows": rows, "layers": shape["layers"], "products": [], "pass_seconds": dict.fromkeys(PRECISIONS, 0.0)}
    for name, n_in, n_out, count in layer_products(shape):
        x = torch.randn(rows, n_in)
        weight = torch.randn(n_out, n_in) / n_in ** 0.5
        exact = torch.nn.functional.linear(x, weight)
        row = {"name": name, "in": n_in, "out": n_out, "count": count}
        for precision in PRECISIONS:
            f = product(precision, weight)
            s = seconds(f, x, repeat)
            row[precision] = {"ms": round(s * 1e3, 3), "gflops": round(2 * rows * n_in * n_out / s / 1e9, 1),
                              "relative_error": round(float((f(x) - exact).norm() / exact.norm()), 4)}
            out["pass_seconds"][precision] += s * count * shape["layers"]
        out["products"].append(row)
    out["pass_seconds"] = {p: round(s, 3) for p, s in out["pass_seconds"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", required=True, type=Path, help="a Hugging Face checkout (config.json and "
                   "*.safetensors: only their sizes are read)")
    p.add_argument("--rows", type=int, default=430, help="rows a product multiplies: a step's tokens (default: 8 "
                   "texts of 42 tokens after a 94-token prefix)")
    p.add_argument("--threads", type=int, default=2, help="torch's threads (default: 2, a 2-core machine's)")
    p.add_argument("--repeat", type=int, default=5, help="timings per product; the best is kept")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    a = p.parse_args(argv)
    if a.rows < 1 or a.repeat < 1 or a.threads < 1:
        p.error("--rows, --repeat and --threads must be 1 or more")
    try:
        shape = checkout_shape(a.checkout)
    except (OSError, ValueError, KeyError) as e:
        p.error(f"{a.checkout}: not a checkout to size ({e})")
    torch.set_num_threads(a.threads)
    result = {"threads": a.threads, "bf16_arithmetic": cpu_has_bf16(), **measure(shape, a.rows, a.repeat)}
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{a.checkout.name}: {shape['layers']} layers, {a.rows} rows, threads: {a.threads}; "
          f"bf16 arithmetic in hardware: {'yes' if result['bf16_arithmetic'] else 'no'}")
    print(f"{'product':<20} {'in->out':>11}" + "".join(f" {p + ' ms':>9} {'GFLOPS':>7}" for p in PRECISIONS)
          + f" {'int8 error':>10}")
    for row in result["products"]:
        print(f"{row['name']:<20} {str(row['in']) + '->' + str(row['out']):>11}"
              + "".join(f" {row[p]['ms']:>9.2f} {row[p]['gflops']:>7.0f}" for p in PRECISIONS)
              + f" {row['int8']['relative_error']:>10.2%}")
    passes = result["pass_seconds"]
    print(f"one pass through all {shape['layers']} layers' products: "
          + ", ".join(f"{p} {s:.2f} s" for p, s in passes.items())
          + f"; a checkpointed training step is about three passes (fp32: {3 * passes['fp32']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
