"""Our converter against llama.cpp's reference converter, on the same checkouts: identical GGUF files.

The reference (`convert_hf_to_gguf.py --outtype f16` of the llama.cpp vendored in the pinned
llama-cpp-python) needs torch and transformers, which the product does not have: it runs in the optional
environment `make reference-env` builds (.venv-ref), or in ALLINONE_REFERENCE_PYTHON. .ci/run builds it,
so CI always runs this test; elsewhere it is skipped with that reason.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_convert
from convert.compare import differences
from tinymodel import build_checkout, fetch_reference_converter

REFERENCE_PYTHON = Path(os.environ.get("ALLINONE_REFERENCE_PYTHON", ROOT / ".venv-ref/bin/python"))

pytestmark = pytest.mark.skipif(not REFERENCE_PYTHON.is_file(),
                                reason=f"no reference environment at {REFERENCE_PYTHON}: run `make reference-env`")

VARIANTS = {
    "qwen1.5-bf16-tied": dict(),
    "untied-f16-2-shards": dict(tied=False, shards=2, dtype="F16"),
    "f32-vocab-merges-only": dict(dtype="F32", tokenizer_json=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_gguf_as_reference_converter(variant, vocab_dir, tmp_path):
    checkout = build_checkout(vocab_dir, tmp_path / variant, **VARIANTS[variant])
    ours, ref = tmp_path / "ours-F16.gguf", tmp_path / "ref-F16.gguf"
    r = run_convert("to-gguf", str(checkout), str(ours))
    assert r.returncode == 0, r.stderr
    script = fetch_reference_converter(vocab_dir)
    p = subprocess.run([str(REFERENCE_PYTHON), str(script), str(checkout), "--outtype", "f16", "--outfile", str(ref)],
                       capture_output=True, text=True, timeout=600, cwd=script.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    assert differences(str(ours), str(ref), include_general=True) == []
