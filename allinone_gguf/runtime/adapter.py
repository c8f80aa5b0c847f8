"""The sentiment adapter: a LoRA fine-tuned for the analyst role only, one for every quantization of a model.

    models/m/m-F16.gguf, m-Q8_0.gguf, m-Q4_K_M.gguf    the model, one file per quantization (chat and sentiment)
    models/m/m.sentiment-lora.gguf      the LoRA, applied by llama.cpp only while the sentiment sequence decodes
    models/m/m.sentiment-lora.json      what it was made for: the weights' identity, the prompt frame, the label
                                        set, the confidence temperature, the training data, the dev accuracy

`python -m allinone_gguf tune` writes the pair beside the model family: the model's name without its `-<quant>`
suffix. `Settings.sentiment_adapter` chooses: "auto" (the family's pair, else the older `<model>.sentiment-lora.*`
beside the file), "off", or the path of an adapter's .gguf. The metadata is checked before llama.cpp reads the
adapter: made for other weights, or for another prompt frame, is a one-line AdapterError rather than silently
wrong labels.

The weights' identity (`weights_identity`) is read from the model's GGUF header, never by hashing the file:
- "checkout:<sha256>": the WEIGHTS_KEY our converter (convert/hf_to_gguf.py) writes into the F16 file, the
  sha256 of the source checkout's safetensors files (`weights_digest`). llama.cpp's quantizer copies every
  key, so `make models`' F16, Q8_0 and Q4_K_M of one checkout carry the same value.
- "tensors:<sha256>" for a GGUF without that key (made by other tools, downloaded): the architecture, every
  tensor's name and shape, and the bytes of the 1-D F32 tensors (norms, biases), which quantizing leaves as
  they are. Cheap (a few hundred KB), the same for every quantization of one set of weights; weaker than the
  checkout digest (two models differing only in their matrices, e.g. a merged LoRA, share it), and it never
  equals a "checkout:" identity, so an adapter tuned on our files is refused by downloaded ones, and back.
An adapter whose metadata predates the identity (only `base_sha256`, the whole file's sha256) still works for
the file it was made for: that file is hashed at start, as before; tune again to use it with every quantization.

    >>> adapter_files("models/m/m-Q4_K_M.gguf")[0].name
    'm.sentiment-lora.gguf'
    >>> model_family("models/m/m-Q4_K_M.gguf"), model_family("qwen2.5-0.5b-instruct-q8_0.gguf")
    ('m', 'qwen2.5-0.5b-instruct')
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

log = logging.getLogger(__name__)

SUFFIX = ".sentiment-lora"
FORMAT = 1
# Ours, not llama.cpp's: the digest of the checkout's weight files, written by convert/hf_to_gguf.py.
WEIGHTS_KEY = "allinone.weights.sha256"
# "<family>-<quant>" as `make models` (and most GGUF publishers, in either case) name a quantization.
QUANT_SUFFIX = re.compile(r"[-.](?:B?F16|F32|I?Q\d\w*)$", re.IGNORECASE)


class AdapterError(ValueError):
    """A LoRA adapter that cannot be converted (convert/lora_to_gguf.py) or used with this model (the sentiment
    adapter, here); the message names the file and says why and what to do."""


def model_family(model_path: str | Path) -> str:
    """The model's file name without ".gguf" and its quantization suffix: "m" for m-Q4_K_M.gguf."""
    stem = Path(model_path).name.removesuffix(".gguf")
    return QUANT_SUFFIX.sub("", stem) or stem


def adapter_files(model_path: str | Path, family: bool = True) -> tuple[Path, Path]:
    """(<family>.sentiment-lora.gguf, <family>.sentiment-lora.json) beside `model_path`, shared by every
    quantization; `family=False`: the older (<model>.sentiment-lora.gguf, .json) of this one file."""
    model_path = Path(model_path)
    base = model_family(model_path) if family else model_path.name.removesuffix(".gguf")
    return model_path.with_name(base + SUFFIX + ".gguf"), model_path.with_name(base + SUFFIX + ".json")


def metadata_file(adapter_path: Path) -> Path:
    name = adapter_path.name[:-5] if adapter_path.name.endswith(".gguf") else adapter_path.name
    return adapter_path.with_name(name + ".json")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read 4 MiB at a time (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(file_sha256s: dict[str, str]) -> str:
    """The checkout identity our converter writes (WEIGHTS_KEY): sha256 over the weight files' names and sha256,
    in name order ({"model.safetensors": "<sha256>"} as `make models`' manifest lists them)."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(file_sha256s.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


class GGUFHeader:
    """The key/value pairs and tensor infos of a GGUF file, read with struct from its header (no tensor data).

    gguf.GGUFReader would do, but it builds arrays for every token and merge of the vocabulary: seconds for a
    Qwen file. `stop_at` ends the reading at that key (our WEIGHTS_KEY sits before the tokenizer's arrays)."""

    SCALARS = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
               gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
               gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
               gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d"}

    def __init__(self, path: str | Path, stop_at: str | None = None):
        self.path = Path(path)
        self.fields: dict[str, object] = {}
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []   # name, dims (GGUF order), type, offset
        with open(self.path, "rb") as f:
            self._f = f
            try:
                self._read(stop_at)
            except (struct.error, UnicodeDecodeError, ValueError) as e:
                raise AdapterError(f"{self.path}: not a GGUF file this version can read ({e})") from None
            self.data_start = -(-f.tell() // self.alignment) * self.alignment if self.tensors else 0

    @property
    def alignment(self) -> int:
        return int(self.fields.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))

    def _unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = self._f.read(size)
        if len(data) != size:
            raise ValueError("the header ends early")
        return struct.unpack("<" + fmt, data)[0]

    def _string(self) -> str:
        return self._f.read(self._unpack("Q")).decode("utf-8")

    def _value(self, vtype: int):
        if vtype == gguf.GGUFValueType.STRING:
            return self._string()
        if vtype in self.SCALARS:
            return self._unpack(self.SCALARS[vtype])
        if vtype != gguf.GGUFValueType.ARRAY:
            raise ValueError(f"value type {vtype}")
        itype, count = self._unpack("I"), self._unpack("Q")
        if itype == gguf.GGUFValueType.STRING:     # skipped: only their lengths are read
            for _ in range(count):
                self._f.seek(self._unpack("Q"), 1)
            return None
        if itype not in self.SCALARS:
            raise ValueError(f"array of value type {itype}")
        self._f.seek(count * struct.calcsize("<" + self.SCALARS[itype]), 1)
        return None

    def _read(self, stop_at: str | None) -> None:
        if self._unpack("I") != gguf.GGUF_MAGIC:
            raise ValueError("no GGUF magic")
        if self._unpack("I") not in (2, 3):
            raise ValueError("GGUF version")
        n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("I"))
            if key == stop_at:
                return
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._unpack("Q") for _ in range(self._unpack("I")))
            self.tensors.append((name, dims, self._unpack("I"), self._unpack("Q")))


def weights_identity(model_path: str | Path) -> str:
    """"checkout:<sha256>" (our converter's WEIGHTS_KEY) or "tensors:<sha256>" (see the module docstring)."""
    header = GGUFHeader(model_path, stop_at=WEIGHTS_KEY)
    if isinstance(header.fields.get(WEIGHTS_KEY), str):
        return "checkout:" + header.fields[WEIGHTS_KEY]
    h = hashlib.sha256(str(header.fields.get(gguf.Keys.General.ARCHITECTURE)).encode("utf-8"))
    kept = []
    for name, dims, ttype, offset in sorted(header.tensors):
        h.update(f"{name} {dims}\n".encode("utf-8"))
        if len(dims) == 1 and ttype == gguf.GGMLQuantizationType.F32:
            kept.append((header.data_start + offset, dims[0] * 4))
    with open(model_path, "rb") as f:
        for offset, size in kept:
            f.seek(offset)
            h.update(f.read(size))
    return "tensors:" + h.hexdigest()


def frame_digest(before: list[int], after: list[int], label_ids: tuple[list[int], list[int]]) -> str:
    """sha256 of the token ids the sentiment role puts around a text and reads its answer from."""
    data = json.dumps({"before": before, "after": after, "labels": [list(label_ids[0]), list(label_ids[1])]})
    return hashlib.sha256(data.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class AdapterInfo:
    """A sentiment adapter's file and what its metadata says about it."""

    path: Path
    labels: str              # label language it was trained for ("zh")
    prompt: str              # SENTIMENT_PROMPTS variant of its frame
    temperature: float       # the confidence is sigmoid(margin / temperature)
    frame_sha256: str
    base_weights: str | None  # weights_identity() of the model it was tuned on; None in older metadata
    meta: dict

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def find_adapter(model_path: str | Path, setting: str) -> AdapterInfo | None:
    """The adapter `setting` asks for ("auto" | "off" | path), with its metadata read; None when there is none."""
    if setting == "off":
        return None
    if setting == "auto":
        found = [pair for pair in (adapter_files(model_path), adapter_files(model_path, family=False))
                 if pair[0].is_file()]
        if not found:
            return None
        path, meta_path = found[0]
    else:
        path = Path(setting)
        if not path.is_file():
            raise AdapterError(f"sentiment adapter {path}: no such file (sentiment_adapter is auto, off or a path)")
        meta_path = metadata_file(path)
    if not meta_path.is_file():
        raise AdapterError(f"sentiment adapter {path}: its metadata {meta_path.name} is missing, so it cannot be "
                           "checked against the model; rebuild it with `python -m allinone_gguf tune` or pass "
                           "--sentiment-adapter off")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        info = AdapterInfo(path=path, labels=meta["labels"], prompt=meta["prompt"],
                           temperature=float(meta["temperature"]), frame_sha256=meta["frame_sha256"],
                           base_weights=meta.get("base_weights"), meta=meta)
        if info.base_weights is None and not isinstance(meta.get("base_sha256"), str):
            raise KeyError("base_weights")      # neither the weights' identity nor (older) the file's sha256
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"sentiment adapter metadata {meta_path}: unreadable ({e!r})") from None
    if meta.get("format") != FORMAT or not info.temperature > 0:
        raise AdapterError(f"sentiment adapter metadata {meta_path}: format {meta.get('format')!r} / temperature "
                           f"{info.temperature} not understood by this version")
    return info


def check_base(info: AdapterInfo, model_path: str | Path) -> None:
    """Refuse an adapter made for other weights: compares weights identities read from the model's header; an
    adapter with older metadata (whole-file sha256 only) is checked, as before, by hashing the model file."""
    model_path = Path(model_path)
    made_for = info.meta.get("base_file", "another model")
    if info.base_weights is None:
        log.info("%s: older metadata without the weights' identity; hashing %s", info.path.name, model_path.name)
        if info.meta["base_sha256"] != file_sha256(model_path):
            raise AdapterError(f"sentiment adapter {info.path.name} was made for the file {made_for} alone (older "
                               f"metadata), not for {model_path.name}; tune it again to use it with every "
                               "quantization of the model, or pass --sentiment-adapter off")
        return
    here = weights_identity(model_path)
    if info.base_weights != here:
        raise AdapterError(f"sentiment adapter {info.path.name} was made for other weights ({made_for}: "
                           f"{info.base_weights[:21]}…) than {model_path.name} ({here[:21]}…); tune one for "
                           "this model or pass --sentiment-adapter off")


def write_metadata(path: Path, meta: dict) -> None:
    meta = {"format": FORMAT, **meta}
    path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
