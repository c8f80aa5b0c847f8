"""Our converter against llama.cpp's reference converter, on the same checkouts: identical GGUF files.

Checkouts: Qwen1.5-style (three layouts), Qwen2.5-Instruct-style (tied, its added tokens and template) and
Qwen3-style (tied and untied, one file and sharded; one without head_dim in config.json).

The reference (`convert_hf_to_gguf.py --outtype f16` of the llama.cpp vendored in the pinned
llama-cpp-python) needs torch and transformers, which the product does not have: it runs in the optional
environment `make reference-env` builds (.venv-ref), or in ALLINONE_REFERENCE_PYTHON. `make test` builds it
first, and there a missing one fails this test; elsewhere it is skipped with that reason.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import CACHE, REFERENCE_PYTHON, run_convert
from convert.compare import OUR_KEYS, differences
from convert.reference_files import reference_converter
from tinymodel import build_checkout



@pytest.fixture(autouse=True)
def _needs_the_reference(reference_python):   # skipped without it, a failure under `make test`
    pass

VARIANTS = {
    "qwen1.5-bf16-tied": dict(),
    "untied-f16-2-shards": dict(tied=False, shards=2, dtype="F16"),
    "f32-vocab-merges-only": dict(dtype="F32", tokenizer_json=False),
    "qwen2.5-instruct-bf16-tied": dict(flavour="qwen2.5"),
    "qwen3-bf16-tied": dict(flavour="qwen3"),
    "qwen3-bf16-untied": dict(flavour="qwen3", tied=False, seed=1),
    "qwen3-tied-2-shards": dict(flavour="qwen3", shards=2, seed=2),
    "qwen3-untied-f16-3-shards": dict(flavour="qwen3", tied=False, shards=3, dtype="F16", seed=3),
}


def assert_same_as_reference(checkout: Path, vocab_dir: Path, tmp_path: Path) -> None:
    ours, ref = tmp_path / "ours-F16.gguf", tmp_path / "ref-F16.gguf"
    r = run_convert("to-gguf", str(checkout), str(ours))
    assert r.returncode == 0, r.stderr
    script = reference_converter(CACHE / "vocab")
    p = subprocess.run([str(REFERENCE_PYTHON), str(script), str(checkout), "--outtype", "f16", "--outfile", str(ref)],
                       capture_output=True, text=True, timeout=600, cwd=script.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    # identical but for the one key our converter adds (the weights' identity), which must be there
    assert differences(str(ours), str(ref), include_general=True, ours_only=OUR_KEYS) == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_gguf_as_reference_converter(variant, vocab_dir, tmp_path):
    assert_same_as_reference(build_checkout(vocab_dir, tmp_path / variant, **VARIANTS[variant]), vocab_dir, tmp_path)


def test_qwen3_without_head_dim_gets_transformers_default_as_in_reference(vocab_dir, tmp_path):
    # Qwen3Config's head_dim defaults to 128, which is what the tiny weights are shaped for.
    checkout = build_checkout(vocab_dir, tmp_path / "qwen3-no-head-dim", flavour="qwen3")
    config = json.loads((checkout / "config.json").read_text())
    del config["head_dim"]
    (checkout / "config.json").write_text(json.dumps(config))
    assert_same_as_reference(checkout, vocab_dir, tmp_path)
