"""Command line of the model pipeline: `python -m convert --help`.

    python -m convert all Qwen/Qwen1.5-0.5B-Chat           # download, convert, quantize (what `make models` runs)
    python -m convert all /path/to/checkout --types Q4_K_M  # a local checkout, only the 4-bit file
    python -m convert download Qwen/Qwen1.5-0.5B-Chat      # just fetch the files
    python -m convert to-gguf CHECKOUT OUT.gguf            # just convert (F16 by default)
    python -m convert quantize IN-F16.gguf OUT.gguf --type Q8_0
    python -m convert lora ADAPTER_DIR BASE.gguf OUT.gguf  # a PEFT LoRA adapter -> GGUF LoRA (F16 by default)
    python -m convert checkout MODEL.gguf OUT_DIR          # the reverse: a GGUF -> a Hugging Face checkout
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from .defaults import MODELS_DIR
from .download import DownloadError, resolve
from .gguf_to_hf import DTYPES, convert_gguf_to_hf
from .hf_to_gguf import OUTTYPES, convert_hf_to_gguf
from .lora_to_gguf import convert_lora_to_gguf
from .pipeline import DEFAULT_TYPES, build_models
from allinone_gguf.runtime.quantize import QUANT_TYPES, quantize_gguf
from .safetensors_np import CheckpointError

_bars: list[tqdm] = []


def tqdm_bar(desc: str, total: int = 0, unit: str = "B"):
    """A progress callback update(done, total) drawing one tqdm bar on stderr, from its first update on
    (so a step that fails before any progress prints nothing but its error)."""
    bar: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(desc=desc, total=total, unit=unit, unit_scale=unit == "B", file=sys.stderr))
            _bars.append(bar[0])
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()
    return update


def _types(text: str) -> tuple[str, ...]:
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in types if t not in DEFAULT_TYPES]
    if bad or not types:
        raise argparse.ArgumentTypeError(f"choose from {','.join(DEFAULT_TYPES)}")
    return types


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Turn a Qwen Hugging Face checkout (Qwen1.5, Qwen2, Qwen2.5, Qwen3) into GGUF files: "
                    "download -> F16 GGUF (our torch-free converter) -> Q8_0 and Q4_K_M (llama.cpp's quantizer).",
        epilog="SRC is a hub id (Qwen/Qwen1.5-0.5B-Chat; HF_ENDPOINT picks a mirror) or a local checkout folder.")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("all", help="download, convert and quantize; skips what is up to date (make models)")
    a.add_argument("src", metavar="SRC", help="hub id or local checkout folder")
    a.add_argument("--out", type=Path, default=MODELS_DIR,
                   help=f"output root; files go to OUT/<name>/ (default: {MODELS_DIR})")
    a.add_argument("--types", type=_types, default=DEFAULT_TYPES,
                   help=f"comma-separated files to make (default: {','.join(DEFAULT_TYPES)})")
    a.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    a.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    a.add_argument("--force", action="store_true", help="rebuild even when the manifest says up to date")

    d = sub.add_parser("download", help="fetch the needed files of a hub model and print the local folder")
    d.add_argument("src", metavar="REPO_ID")
    d.add_argument("--revision")

    c = sub.add_parser("to-gguf", help="convert a local checkout to one GGUF file")
    c.add_argument("checkout", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--outtype", choices=list(OUTTYPES), default="F16", help="default: F16")

    q = sub.add_parser("quantize", help="quantize an F16/F32 GGUF with llama.cpp's quantizer")
    q.add_argument("src", type=Path)
    q.add_argument("dst", type=Path)
    q.add_argument("--type", dest="qtype", choices=list(QUANT_TYPES), required=True)
    q.add_argument("--threads", type=int, default=None)

    lo = sub.add_parser("lora", help="convert a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) "
                                     "to a GGUF LoRA for llama.cpp")
    lo.add_argument("adapter", type=Path, help="the adapter folder (what PEFT's save_pretrained writes)")
    lo.add_argument("base", type=Path, help="the model it was trained on: its GGUF file or its checkout folder")
    lo.add_argument("out", type=Path)
    lo.add_argument("--outtype", choices=list(OUTTYPES), default="F16", help="default: F16")

    ck = sub.add_parser("checkout", help="rebuild a Hugging Face checkout from a Qwen GGUF (dequantized, torch-free), "
                                         "for fine-tuning when there is no original checkout")
    ck.add_argument("model", type=Path, help="the GGUF file (F16, Q8_0, Q4_K_M, ...)")
    ck.add_argument("out", type=Path, help="the checkout folder to write (new or empty)")
    ck.add_argument("--dtype", choices=list(DTYPES), default="F16",
                    help="what quantized tensors become (default: F16; F32/F16/BF16 tensors keep their bytes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "all":
            m = build_models(args.src, args.out, args.types, args.revision, args.force, args.threads, bar=tqdm_bar)
            for t, o in m["outputs"].items():
                print(f"{t:7} {Path(m['folder']) / o['file']}  ({o['bytes'] / 1e6:.0f} MB)")
            if not _bars:
                print("up to date: nothing rebuilt", file=sys.stderr)
        elif args.command == "download":
            print(resolve(args.src, args.revision).checkout)
        elif args.command == "to-gguf":
            print(convert_hf_to_gguf(args.checkout, args.out, args.outtype, progress=tqdm_bar("convert")))
        elif args.command == "quantize":
            print(quantize_gguf(args.src, args.dst, args.qtype, args.threads, progress=tqdm_bar("quantize", unit="tensor")))
        elif args.command == "lora":
            print(convert_lora_to_gguf(args.adapter, args.base, args.out, args.outtype, progress=tqdm_bar("convert")))
        elif args.command == "checkout":
            print(convert_gguf_to_hf(args.model, args.out, args.dtype, progress=tqdm_bar("dequantize", unit="tensor")))
    except (CheckpointError, DownloadError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no partial files were kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
