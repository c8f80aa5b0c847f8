"""llama.cpp's own reference files, taken from the pinned llama-cpp-python source package on PyPI.

    from convert.reference_files import reference_converter, reference_lora_converter, vendored_file
    script = reference_converter(Path(".cache/vocab"))        # llama.cpp's convert_hf_to_gguf.py and its imports
    lora = reference_lora_converter(Path(".cache/vocab"))     # its convert_lora_to_gguf.py, beside it
    header = vendored_file(Path(".cache/vocab"), "ggml/include/ggml.h")

The sdist carries the llama.cpp that the installed llama-cpp-python was built from (`vendor/llama.cpp/`), so
what we compare with is exactly what we run. It is downloaded once with pip into
`CACHE/llama-cpp-python-<version>/` and files are extracted beside it on first use. Used by the golden tests
and by `python -m allinone_gguf.measure.convert_bench`; no product code path needs it.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

VENDOR = "vendor/llama.cpp/"   # where llama.cpp sits inside the sdist (after its top folder)
# What convert_hf_to_gguf.py imports besides the standard library and torch/transformers.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
# convert_lora_to_gguf.py reuses the model classes of conversion/ (and gguf-py/) from the same folder.
LORA_CONVERTER_PARTS = ("convert_lora_to_gguf.py", *CONVERTER_PARTS)


def cache_folder(cache: Path) -> Path:
    """`cache/llama-cpp-python-<installed version>`: the sdist and what is extracted from it."""
    return Path(cache) / f"llama-cpp-python-{metadata.version('llama-cpp-python')}"


def sdist(cache: Path) -> Path:
    """The llama-cpp-python source package of the installed version, downloaded once."""
    folder = cache_folder(cache)
    found = sorted(folder.glob("*.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    version = metadata.version("llama-cpp-python")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(folder), f"llama-cpp-python=={version}"], check=True)
    found = sorted(folder.glob("*.tar.gz"))
    if not found:
        raise FileNotFoundError(f"{folder}: pip left no llama-cpp-python {version} source package here")
    return found[0]


def extract(cache: Path, wanted, dest: Path) -> list[Path]:
    """Extract the sdist's files under vendor/llama.cpp/ whose relative path is in `wanted` (a path ending in
    "/" takes a whole folder) into `dest`, keeping their relative paths; the files written."""
    wanted = tuple(wanted)
    written = []
    with tarfile.open(sdist(cache)) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            rel = inner.removeprefix(VENDOR) if inner.startswith(VENDOR) else None
            if member.isfile() and rel and any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in wanted):
                path = dest / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tar.extractfile(member).read())
                written.append(path)
    return written


def vendored_file(cache: Path, rel: str) -> Path:
    """One file of the vendored llama.cpp (path relative to its root, e.g. "ggml/include/ggml.h")."""
    dest = cache_folder(cache) / "llama.cpp"
    path = dest / rel
    if not path.is_file() and not extract(cache, [rel], dest):
        raise FileNotFoundError(f"{sdist(cache)}: no {VENDOR}{rel}")
    return path


def _reference_script(cache: Path, name: str, parts) -> Path:
    root = cache_folder(cache) / "reference"
    script = root / name
    if not script.is_file():
        extract(cache, parts, root)
    if not script.is_file():
        raise FileNotFoundError(f"{sdist(cache)}: no {VENDOR}{name}")
    return script


def reference_converter(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, with the conversion/ and gguf-py/ it imports beside it."""
    return _reference_script(cache, "convert_hf_to_gguf.py", CONVERTER_PARTS)


def reference_lora_converter(cache: Path) -> Path:
    """llama.cpp's convert_lora_to_gguf.py, beside the convert_hf_to_gguf.py, conversion/ and gguf-py/ it uses."""
    return _reference_script(cache, "convert_lora_to_gguf.py", LORA_CONVERTER_PARTS)
