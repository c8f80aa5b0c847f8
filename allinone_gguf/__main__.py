"""`python -m allinone_gguf classify|chat|watch|bench|tune`: the command line of the runtime.

    python -m allinone_gguf classify reviews.csv -o scored.csv --gold label
    python -m allinone_gguf chat
    python -m allinone_gguf watch messages.csv --by author --time time -o watch/   # wellbeing alerts
    python -m allinone_gguf bench --model models/Qwen1.5-0.5B-Chat/Qwen1.5-0.5B-Chat-Q4_K_M.gguf
    python -m allinone_gguf tune MODEL.gguf --data ../shared/data/sentiment/train/*.csv   # sentiment LoRA

`python -m allinone_gguf COMMAND --help` explains each command's options.
"""
from __future__ import annotations

import argparse
import sys

from .faces import cli, tune_cli, watch
from .measure import bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m allinone_gguf",
        description="One small Qwen GGUF model on the CPU: sentiment (正面/负面 with a confidence) and "
                    "an empathetic streamed reply.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli.add_classify_parser(sub)
    cli.add_chat_parser(sub)
    watch.add_watch_parser(sub)
    bench.add_bench_parser(sub)
    tune_cli.add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except cli.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `... classify big.csv | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
