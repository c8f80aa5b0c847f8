"""The sentiment adapter: a LoRA fine-tuned for the analyst role only, found next to the model file.

    model.gguf                      the model (chat and sentiment)
    model.sentiment-lora.gguf       the LoRA, applied by llama.cpp only while the sentiment sequence decodes
    model.sentiment-lora.json       what it was made for: the model file's sha256, the prompt frame, the label
                                    set, the confidence temperature, the training data, the dev accuracy

`python -m allinone_gguf tune` writes the pair (allinone_gguf/tune/). `Settings.sentiment_adapter` chooses:
"auto" (the pair next to the model when present), "off", or the path of an adapter's .gguf. The metadata is
checked before llama.cpp reads the adapter: made for another model file, or for another prompt frame, is a
clear error rather than silently wrong labels.

    >>> adapter_files("models/m/m-Q4_K_M.gguf")[0].name
    'm-Q4_K_M.sentiment-lora.gguf'
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".sentiment-lora"
FORMAT = 1


class AdapterError(ValueError):
    """The sentiment adapter cannot be used with this model (its message says why and what to do)."""


def adapter_files(model_path: str | Path) -> tuple[Path, Path]:
    """(<model>.sentiment-lora.gguf, <model>.sentiment-lora.json) beside `model_path`."""
    model_path = Path(model_path)
    stem = model_path.name[:-5] if model_path.name.endswith(".gguf") else model_path.name
    return model_path.with_name(stem + SUFFIX + ".gguf"), model_path.with_name(stem + SUFFIX + ".json")


def metadata_file(adapter_path: Path) -> Path:
    name = adapter_path.name[:-5] if adapter_path.name.endswith(".gguf") else adapter_path.name
    return adapter_path.with_name(name + ".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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
    base_sha256: str
    meta: dict

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def find_adapter(model_path: str | Path, setting: str) -> AdapterInfo | None:
    """The adapter `setting` asks for ("auto" | "off" | path), with its metadata read; None when there is none."""
    if setting == "off":
        return None
    if setting == "auto":
        path, meta_path = adapter_files(model_path)
        if not path.is_file():
            return None
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
                           base_sha256=meta["base_sha256"], meta=meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"sentiment adapter metadata {meta_path}: unreadable ({e!r})") from None
    if meta.get("format") != FORMAT or not info.temperature > 0:
        raise AdapterError(f"sentiment adapter metadata {meta_path}: format {meta.get('format')!r} / temperature "
                           f"{info.temperature} not understood by this version")
    return info


def check_base(info: AdapterInfo, model_path: str | Path, model_sha256: str) -> None:
    """Refuse an adapter made for another model file."""
    if info.base_sha256 != model_sha256:
        made_for = info.meta.get("base_file", "another file")
        raise AdapterError(f"sentiment adapter {info.path.name} was made for {made_for} (sha256 "
                           f"{info.base_sha256[:12]}…), not for {Path(model_path).name} (sha256 {model_sha256[:12]}…);"
                           " tune one for this model or pass --sentiment-adapter off")


def write_metadata(path: Path, meta: dict) -> None:
    meta = {"format": FORMAT, **meta}
    path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
