"""`python -m allinone_gguf tune MODEL.gguf --data CSV...`: the command line of the sentiment-adapter training."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..tune.config import TuneSettings
from .flags import add_dataclass_arguments, overrides

EPILOG = """
Writes <family>.sentiment-lora.gguf and .json beside MODEL (<family>: its name without -Q4_K_M etc.); the app,
the CLI, bench and evaluate then use the adapter for the sentiment role with every quantization of the same
weights (--sentiment-adapter off to compare). Needs the tuning environment (`make tune-env`: torch + peft in
.venv-tune) and the Hugging Face checkout MODEL was converted from (found through the manifest `make models`
writes, or --hf). Train on ../shared/data/sentiment/train/ only and choose settings on the dev200 files (--dev).
Ctrl-C stops training and keeps the best checkpoint so far.

example:
  python -m allinone_gguf tune models/qwen-proxy-0.5b-chat-hf/qwen-proxy-0.5b-chat-hf-Q4_K_M.gguf \\
      --data ../shared/data/sentiment/train/*.csv --dev ../shared/data/sentiment/waimai_10k.dev200.csv
"""


def add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="fine-tune a sentiment LoRA for the analyst role (needs make tune-env)",
                       description="Fine-tune a LoRA that only the sentiment role uses: trained in the runtime's "
                                   "own prompt frame on labelled CSV files (label,text; 1 = positive), converted "
                                   "to GGUF, its confidence temperature fitted on held-back texts.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.gguf", help="the model file the adapter is for")
    p.add_argument("--data", nargs="+", required=True, metavar="CSV", help="training files (label,text)")
    p.add_argument("--dev", nargs="*", default=[], metavar="CSV",
                   help="files to report accuracy on with the adapter (recorded in the metadata; the grammar path "
                        "beside it: make bench-adapter)")
    p.add_argument("--hf", metavar="DIR", help="the Hugging Face checkout MODEL came from (default: its manifest)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores, at most 4)")
    p.add_argument("--work", metavar="DIR", help="folder for the token ids and the PEFT adapter "
                                                  "(default: beside the model)")
    add_dataclass_arguments(p, TuneSettings, title="training")
    p.set_defaults(func=run_tune)


def run_tune(args) -> int:
    from ..tune.run import TuneError, tune
    from .classify_common import UserError
    settings = TuneSettings(**overrides(args, [f.name for f in dataclasses.fields(TuneSettings)]))
    try:
        tune(args.model, args.data, hf=args.hf, dev=args.dev, settings=settings, threads=args.threads,
             work=args.work, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (TuneError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return 0
