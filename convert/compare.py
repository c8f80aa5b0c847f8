"""Compare two GGUF files: tensors (names, shapes, types, bytes) and metadata, and list every difference.

    python -m convert.compare ours-F16.gguf reference-F16.gguf

Used by the reference-equivalence test and by hand; exits 1 when the files differ. Our converter writes one
key the reference does not (OUR_KEYS: the weights' identity a sentiment adapter is bound to); the comparison
expects it in our file alone, and everything else identical.
"""
from __future__ import annotations

import hashlib
import sys

import gguf
import numpy as np

from allinone_gguf.runtime.adapter import WEIGHTS_KEY

# Written by our converter only (convert/hf_to_gguf.py), never by llama.cpp's.
OUR_KEYS = (WEIGHTS_KEY,)
# general.* keys describe provenance (names from the model card, the converter's own version), not the model.
PROVENANCE_PREFIX = "general."


def _field_value(field: gguf.ReaderField):
    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [field.contents(i) for i in range(len(field.data))] if field.data else []
    return field.contents()


def metadata(reader: gguf.GGUFReader) -> dict[str, object]:
    return {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def tensors(reader: gguf.GGUFReader) -> dict[str, tuple[tuple[int, ...], str, str]]:
    out = {}
    for t in reader.tensors:
        digest = hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).tobytes()).hexdigest()
        out[t.name] = (tuple(int(x) for x in t.shape), t.tensor_type.name, digest)
    return out


def differences(ours: str, reference: str, include_general: bool = False,
                ours_only: tuple[str, ...] = ()) -> list[str]:
    """Every difference; the `ours_only` keys must be in `ours` and not in `reference` (OUR_KEYS when `ours` is
    our converter's F16 and `reference` llama.cpp's)."""
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(reference)
    diffs = []
    ma, mb = metadata(a), metadata(b)
    for key in sorted(set(ma) | set(mb) | set(ours_only)):
        if key.startswith(PROVENANCE_PREFIX) and not include_general:
            continue
        if key in ours_only:
            if key not in ma or key in mb:
                diffs.append(f"metadata {key}: should be in ours alone (ours: {key in ma}, reference: {key in mb})")
        elif key not in ma:
            diffs.append(f"metadata {key}: only in reference")
        elif key not in mb:
            diffs.append(f"metadata {key}: only in ours")
        elif ma[key] != mb[key]:
            diffs.append(f"metadata {key}: {str(ma[key])[:80]} != {str(mb[key])[:80]}")
    ta, tb = tensors(a), tensors(b)
    for name in sorted(set(ta) | set(tb)):
        if name not in ta:
            diffs.append(f"tensor {name}: only in reference")
        elif name not in tb:
            diffs.append(f"tensor {name}: only in ours")
        elif ta[name] != tb[name]:
            diffs.append(f"tensor {name}: {ta[name][:2]} != {tb[name][:2]} or bytes differ")
    return diffs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    diffs = differences(*argv, include_general=True, ours_only=OUR_KEYS)
    for d in diffs:
        print(d)
    print("identical" if not diffs else f"{len(diffs)} differences")
    return 1 if [d for d in diffs if not d.startswith("metadata general.")] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
