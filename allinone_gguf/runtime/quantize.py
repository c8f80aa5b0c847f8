"""Quantize a GGUF file with llama.cpp's own quantizer (through llama-cpp-python), showing progress.

    python -m convert quantize models/X/X-F16.gguf models/X/X-Q4_K_M.gguf --type Q4_K_M

`quantize_gguf(src, dst, "Q8_0")` from Python (the pipeline in convert/ calls it; it lives in the runtime, the one
layer that talks to llama.cpp). The quantizer reports each tensor through llama.cpp's log
("[  12/ 290] blk.0.attn_q.weight ..."); we read those lines to drive a progress callback and keep them
off the terminal. Output goes to `<dst>.tmp` first, so a failed run leaves no half-written file.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path
from typing import Callable

import llama_cpp

# GGUF spelling -> llama_ftype
QUANT_TYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}
_STEP = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")
# enum ggml_log_level of the llama.cpp vendored in llama-cpp-python 0.3.36 (ggml/include/ggml.h). Older ggml,
# and llama_cpp._logger's table, numbered them NONE, INFO, WARN, ERROR, DEBUG: read with that table, a failed
# run reports its warnings and drops the real error. CONT continues the previous message at its level.
LOG_NONE, LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_CONT = range(6)


_LLAMA_LOG = logging.getLogger("llama-cpp-python")    # where llama-cpp-python's own callback sends llama.cpp's lines


@llama_cpp.llama_log_callback
def _to_logging(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log lines to Python logging once a quantization is over (module-level: never collected)."""
    kind = {LOG_ERROR: logging.ERROR, LOG_WARN: logging.WARNING, LOG_INFO: logging.INFO}.get(level, logging.DEBUG)
    if _LLAMA_LOG.isEnabledFor(kind):
        _LLAMA_LOG.log(kind, (text or b"").decode("utf-8", "replace").rstrip("\n"))


class ErrorLog:
    """The error messages among llama.cpp's log callbacks, each whole (CONT pieces joined to their message)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._level = LOG_NONE

    def add(self, level: int, text: bytes | None) -> None:
        continued = level == LOG_CONT
        if not continued:
            self._level = level
        if self._level != LOG_ERROR:
            return
        piece = (text or b"").decode("utf-8", "replace")
        if continued and self.messages:
            self.messages[-1] += piece
        else:
            self.messages.append(piece)

    def summary(self) -> str:
        return "; ".join(m.strip() for m in self.messages if m.strip())


def quantize_gguf(src: Path, dst: Path, qtype: str, n_threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `dst` as `qtype` from the F16/F32 GGUF `src`; `progress(tensor_index, n_tensors)` per tensor."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"quant type {qtype!r}: choose one of {', '.join(QUANT_TYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    tmp = dst.with_name(dst.name + ".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = n_threads or os.cpu_count() or 1
    errors = ErrorLog()

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        errors.add(level, text)
        m = _STEP.search(text or b"")
        if m and progress:
            progress(int(m.group(1)), int(m.group(2)))

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_to_logging, ctypes.c_void_p(0))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        detail = errors.summary() or f"llama_model_quantize returned {rc}"
        raise RuntimeError(f"{src}: quantizing to {qtype} failed: {detail}")
    os.replace(tmp, dst)
    return dst
