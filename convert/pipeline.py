"""`make models`: download (or take a local checkout), convert to F16 GGUF, quantize, write a manifest.

    python -m convert all Qwen/Qwen1.5-0.5B-Chat --out models
    python -m convert all /path/to/local/checkout --out models

Output: `<out>/<name>/<name>-F16.gguf`, `-Q8_0.gguf`, `-Q4_K_M.gguf` and `manifest.json` (source, revision,
input hashes, output sizes and sha256). A second run with unchanged inputs rebuilds nothing; a missing or
changed output is rebuilt alone.
"""
from __future__ import annotations

import json
import logging
import time
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Callable

from allinone_gguf.runtime.adapter import file_sha256

from .defaults import MANIFEST, gguf_name
from .download import NEEDED_FILES, Source, resolve
from .hf_to_gguf import convert_hf_to_gguf
from allinone_gguf.runtime.quantize import QUANT_TYPES, quantize_gguf

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("F16", *QUANT_TYPES)   # the converter's F16, then each quantizer type


def _tool_versions() -> dict[str, str]:
    out = {}
    for pkg in ("allinone-gguf", "gguf", "llama-cpp-python"):
        try:
            out[pkg] = pkg_metadata.version(pkg)
        except pkg_metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _input_files(checkout: Path) -> list[Path]:
    import fnmatch
    return sorted(p for p in checkout.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in NEEDED_FILES))


def _fingerprint(checkout: Path, previous: dict) -> list[dict]:
    """name, size, mtime and sha256 of each input; the hash is reused when size and mtime did not change."""
    known = {i["file"]: i for i in previous.get("inputs", [])}
    out = []
    for p in _input_files(checkout):
        st = p.stat()   # follows the hub cache's symlinks to the blobs
        old = known.get(p.name)
        if old and old["bytes"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            out.append(old)
        else:
            out.append({"file": p.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(p)})
    return out


def build_models(src: str, out_root: Path, types: tuple[str, ...] = DEFAULT_TYPES, revision: str | None = None,
                 force: bool = False, n_threads: int | None = None,
                 bar: Callable[[str, int, str], Callable[[int, int], None]] | None = None) -> dict:
    """Make the GGUF files for `src` under out_root/<name>/ and return the manifest.

    `bar(description, total, unit)` makes a progress callback `update(done, total)` per step; None = silent.
    """
    unknown = [t for t in types if t not in DEFAULT_TYPES]
    if unknown:
        raise ValueError(f"unknown type {unknown[0]!r}; choose from {', '.join(DEFAULT_TYPES)}")
    source: Source = resolve(src, revision, progress=bar is not None)
    folder = Path(out_root) / source.name
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    previous = {}
    if manifest_path.is_file() and not force:
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s: unreadable, rebuilding everything", manifest_path)
    inputs = _fingerprint(source.checkout, previous)
    tools = _tool_versions()
    same_inputs = (previous.get("inputs") == inputs and previous.get("tools") == tools
                   and previous.get("revision") == source.revision)
    outputs = dict(previous.get("outputs", {})) if same_inputs else {}

    def up_to_date(qtype: str) -> bool:
        entry = outputs.get(qtype)
        path = folder / gguf_name(source.name, qtype)
        return bool(entry) and path.is_file() and path.stat().st_size == entry["bytes"]

    f16 = folder / gguf_name(source.name, "F16")
    needs_f16 = any(not up_to_date(t) for t in types)   # quantizing needs the F16 file
    if needs_f16 and not up_to_date("F16"):
        start = time.perf_counter()
        convert_hf_to_gguf(source.checkout, f16, "F16", progress=bar and bar(f"convert  {f16.name}", 0, "B"),
                           known_sha256={i["file"]: i["sha256"] for i in inputs})
        outputs["F16"] = {"file": f16.name, "bytes": f16.stat().st_size, "sha256": file_sha256(f16),
                          "seconds": round(time.perf_counter() - start, 2)}
        outputs = {"F16": outputs["F16"]}   # older quantizations came from an older F16
    for qtype in types:
        if qtype == "F16" or up_to_date(qtype):
            continue
        dst = folder / gguf_name(source.name, qtype)
        start = time.perf_counter()
        quantize_gguf(f16, dst, qtype, n_threads, progress=bar and bar(f"quantize {dst.name}", 0, "tensor"))
        outputs[qtype] = {"file": dst.name, "bytes": dst.stat().st_size, "sha256": file_sha256(dst),
                          "seconds": round(time.perf_counter() - start, 2)}
    if "F16" not in types and f16.is_file():
        f16.unlink()
        outputs.pop("F16", None)
    manifest = {
        "source": source.origin,
        "revision": source.revision,
        "inputs": inputs,
        "tools": tools,
        "outputs": {t: outputs[t] for t in types if t in outputs},
    }
    if manifest != {k: previous.get(k) for k in manifest}:
        manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest["folder"] = str(folder)
    return manifest
