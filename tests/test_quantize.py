"""allinone_gguf/runtime/quantize.py: llama.cpp's log levels as its own ggml.h numbers them, and the real error of a failed run."""
from __future__ import annotations

import re

import pytest

from conftest import CACHE
from allinone_gguf.runtime import quantize
from convert.reference_files import vendored_file


def test_log_levels_are_the_vendored_ggml_h_enum():
    header = vendored_file(CACHE / "vocab", "ggml/include/ggml.h").read_text(encoding="utf-8")
    enum = dict(re.findall(r"GGML_LOG_LEVEL_(\w+)\s*=\s*(\d+)", header))
    ours = {name: getattr(quantize, f"LOG_{name}") for name in ("NONE", "DEBUG", "INFO", "WARN", "ERROR", "CONT")}
    assert {k: int(v) for k, v in enum.items()} == ours


def test_error_log_keeps_errors_with_their_continuations_and_nothing_else():
    log = quantize.ErrorLog()
    for level, text in [(quantize.LOG_INFO, b"[  1/ 290] blk.0.attn_q.weight\n"),
                        (quantize.LOG_WARN, b"tensor cols 100 not divisible by 256, falling back\n"),
                        (quantize.LOG_CONT, b"  (warning continued)\n"),
                        (quantize.LOG_ERROR, b"llama_model_quantize: failed to quantize: "),
                        (quantize.LOG_CONT, b"bad magic\n"),
                        (quantize.LOG_DEBUG, b"freeing\n"),
                        (quantize.LOG_ERROR, b"second error\n")]:
        log.add(level, text)
    assert log.summary() == "llama_model_quantize: failed to quantize: bad magic; second error"


def test_a_failed_quantization_reports_llama_cpps_error(tmp_path):
    src, dst = tmp_path / "broken-F16.gguf", tmp_path / "broken-Q8_0.gguf"
    src.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)   # a header with nonsense counts
    with pytest.raises(RuntimeError) as err:
        quantize.quantize_gguf(src, dst, "Q8_0", n_threads=1)
    message = str(err.value)
    assert message.startswith(f"{src}: quantizing to Q8_0 failed: ")
    assert "failed to quantize" in message and "returned" not in message, message
    assert not dst.exists() and not dst.with_name(dst.name + ".tmp").exists()
