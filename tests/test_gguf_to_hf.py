"""GGUF -> Hugging Face checkout (`python -m convert checkout`, convert/gguf_to_hf.py) and `tune` from a GGUF alone.

The golden test is the round trip: tiny checkout -> F16 GGUF (`python -m convert all`, conftest) -> checkout (ours)
-> F16 GGUF again gives the same tensors, byte for byte, for the Qwen1.5-style and the Qwen3-style tiny models.
transformers (in .venv-tune, through a subprocess: the product's venv has no torch) checks the rebuilt checkout
against the original one; llama.cpp checks the one rebuilt from the Q8_0 file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allinone_gguf.runtime import AllInOne
from allinone_gguf.runtime.adapter import WEIGHTS_KEY, adapter_files, weights_identity
from allinone_gguf.runtime.prompts import LABEL_SETS
from allinone_gguf.tune.run import TuneError, find_checkout
from conftest import ROOT, run_convert
from convert.compare import differences
from convert.gguf_to_hf import SOURCE_FILE
from convert.safetensors_np import checkpoint_tensors
from tinymodel import build_checkout
from test_tune import TEXTS, TUNE_PYTHON, need_tune_env, write_csv

# The one metadata key a GGUF made again from the rebuilt checkout may differ in: our converter's identity of
# the checkout's safetensors *files* (allinone_gguf/runtime/adapter.py), and the rebuilt file is another file.
# Everything else, general.* (names, size label, sampling settings) included, must come back.
EXPECTED_DIFFERENCES = (WEIGHTS_KEY,)

# Runs in .venv-tune: the two checkouts' tokenizers on a few texts and the chat template, and their logits on
# one short input, as JSON on the last line.
COMPARE_IN_TRANSFORMERS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
a, b = sys.argv[1], sys.argv[2]
texts = ["味道很好，下次还来。", "Hello world! It's 2024.\n\n  ok", "<|im_start|>user\n你好<|im_end|>\n"]
ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
chat = [{"role": "user", "content": "你好"}]
ids = torch.tensor([ta(texts[0])["input_ids"]])
logits = []
for path in (a, b):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits.append(model(ids).logits)
print(json.dumps({
    "same_ids": [ta(t)["input_ids"] == tb(t)["input_ids"] for t in texts],
    "same_chat": ta.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                 == tb.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
    "special": [[t.eos_token, t.pad_token] for t in (ta, tb)],
    "max_abs_diff": float((logits[0] - logits[1]).abs().max()), "largest": float(logits[0].abs().max())}))
"""


def rebuild(gguf_file: Path, out: Path, *extra: str) -> Path:
    r = run_convert("checkout", str(gguf_file), str(out), *extra)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module", params=["qwen1.5", "qwen3"])
def round_trip(request, tmp_path_factory):
    """(original checkout, its F16 GGUF, the checkout rebuilt from it, the F16 GGUF made from that)."""
    models = request.getfixturevalue("tiny_models" if request.param == "qwen1.5" else "tiny_qwen3_models")
    checkout = request.getfixturevalue("tiny_checkout" if request.param == "qwen1.5" else "tiny_qwen3_checkout")
    tmp = tmp_path_factory.mktemp("round-trip")
    rebuilt = rebuild(models["F16"], tmp / "rebuilt")
    again = tmp / "again-F16.gguf"
    r = run_convert("to-gguf", str(rebuilt), str(again))
    assert r.returncode == 0, r.stderr
    return checkout, models["F16"], rebuilt, again


def test_round_trip_gives_the_same_f16_tensors_and_metadata(round_trip):
    checkout, f16, rebuilt, again = round_trip
    diffs = differences(str(again), str(f16), include_general=True)
    assert [d.split(":")[0] for d in diffs] == [f"metadata {k}" for k in EXPECTED_DIFFERENCES], diffs


def test_rebuilt_checkout_is_shaped_like_the_original(round_trip):
    checkout, f16, rebuilt, again = round_trip
    ours, theirs = (json.loads((c / "config.json").read_text()) for c in (rebuilt, checkout))
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ours[key] == theirs[key], key
    assert ours.get("head_dim") == theirs.get("head_dim") and ours["torch_dtype"] == "float16"
    names = {t.name: t.shape for t in checkpoint_tensors(rebuilt)}
    assert names == {t.name: t.shape for t in checkpoint_tensors(checkout)}       # tied: no lm_head in either
    generation = json.loads((rebuilt / "generation_config.json").read_text())
    original = json.loads((checkout / "generation_config.json").read_text())
    for key in ("top_k", "top_p", "temperature", "repetition_penalty", "bos_token_id", "pad_token_id"):
        assert generation.get(key) == original.get(key), key
    source = json.loads((rebuilt / SOURCE_FILE).read_text())
    assert source["gguf"] == f16.name and source[WEIGHTS_KEY] == weights_identity(f16).split(":")[1]


def test_transformers_loads_the_rebuilt_checkout_with_the_originals_logits(round_trip):
    need_tune_env()
    checkout, f16, rebuilt, again = round_trip
    r = subprocess.run([str(TUNE_PYTHON), "-c", COMPARE_IN_TRANSFORMERS, str(checkout), str(rebuilt)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(found["same_ids"]) and found["same_chat"], found
    assert found["special"][0] == found["special"][1] == ["<|im_end|>", "<|endoftext|>"]
    assert found["max_abs_diff"] < 1e-2 and found["largest"] > 0.1, found      # logits that are not all zero


def test_untied_checkout_gets_its_lm_head_back(vocab_dir, tmp_path):
    checkout = build_checkout(vocab_dir, tmp_path / "untied", tied=False)
    f16 = tmp_path / "untied-F16.gguf"
    assert run_convert("to-gguf", str(checkout), str(f16)).returncode == 0
    rebuilt = rebuild(f16, tmp_path / "rebuilt")
    assert json.loads((rebuilt / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in {t.name for t in checkpoint_tensors(rebuilt)}
    again = tmp_path / "again-F16.gguf"
    assert run_convert("to-gguf", str(rebuilt), str(again)).returncode == 0
    assert [d.split(":")[0] for d in differences(str(again), str(f16), include_general=True)] == \
        [f"metadata {k}" for k in EXPECTED_DIFFERENCES]


def test_checkout_from_q8_0_is_close_to_the_original_and_runs_in_llama_cpp(tiny_models, tiny_checkout, tmp_path):
    rebuilt = rebuild(tiny_models["Q8_0"], tmp_path / "rebuilt")
    original = {t.name: t for t in checkpoint_tensors(tiny_checkout)}
    for t in checkpoint_tensors(rebuilt):
        a, b = np.concatenate(list(t.rows())), np.concatenate(list(original[t.name].rows()))
        # Q8_0 rounds each block of 32 to 255 steps of its largest |value| (N(0, 0.02) weights: < 1e-3 off)
        assert np.abs(a - b).max() < 1e-3, t.name
    f16 = tmp_path / "rebuilt-F16.gguf"
    r = run_convert("to-gguf", str(rebuilt), str(f16))
    assert r.returncode == 0, r.stderr
    with AllInOne(f16, parallel=1, n_ctx=1024) as bot:
        found = bot.classify("味道很好，下次还来。")
    assert found.label in LABEL_SETS["zh"] and abs(sum(found.probs.values()) - 1) < 1e-6


def test_refuses_what_it_cannot_rebuild_in_one_line(tiny_models, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf at all")
    for args, words in (((tiny_models["F16"], tmp_path / "full"), ("not an empty folder",)),
                        ((not_gguf, tmp_path / "out"), ("not a GGUF file",)),
                        ((tmp_path / "missing.gguf", tmp_path / "out"), ("no such file",))):
        r = run_convert("checkout", *map(str, args))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


# -- tune from a GGUF alone ------------------------------------------------------------------------------------------
@pytest.fixture()
def family(tiny_models, tmp_path) -> Path:
    """tiny-Q8_0.gguf beside tiny-F16.gguf (same weights), with no manifest.json and no checkout anywhere."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    for q in ("F16", "Q8_0"):
        shutil.copy(tiny_models[q], folder / f"tiny-{q}.gguf")
    return folder


def test_find_checkout_rebuilds_from_the_f16_sibling_once(family):
    lines: list[str] = []
    checkout = find_checkout(family / "tiny-Q8_0.gguf", None, log=lines.append)
    assert checkout == family / "tiny-F16-hf" and (checkout / "model.safetensors").is_file()
    assert "rebuilding" in lines[0] and "tiny-F16.gguf" in lines[0]
    assert find_checkout(family / "tiny-Q8_0.gguf", None, log=lines.append) == checkout    # reused
    assert "before" in lines[1]
    (family / "tiny-F16.gguf").unlink()                 # no F16: the quantized file itself, the weights it runs
    assert find_checkout(family / "tiny-Q8_0.gguf", None, log=lines.append) == family / "tiny-Q8_0-hf"
    (family / "tiny-F16-hf" / SOURCE_FILE).unlink()     # a folder of that name that is not ours is left alone
    shutil.copy(family / "tiny-Q8_0.gguf", family / "tiny-F16.gguf")
    with pytest.raises(TuneError, match="--hf"):
        find_checkout(family / "tiny-Q8_0.gguf", None, log=lines.append)


def test_tune_on_a_gguf_alone_end_to_end(family):
    need_tune_env()
    model = family / "tiny-Q8_0.gguf"
    data = write_csv(family / "train.csv", TEXTS * 3)
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "tune", str(model), "--data", str(data),
                        "--texts", "16", "--held", "6", "--batch", "4", "--threads", "2",
                        "--work", str(family / "work")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rebuilding a Hugging Face checkout from tiny-F16.gguf" in r.stdout + r.stderr
    meta = json.loads(adapter_files(model)[1].read_text(encoding="utf-8"))
    assert meta["checkout"] == str(family / "tiny-F16-hf") and meta["base_weights"] == weights_identity(model)
    with AllInOne(model, n_ctx=1024) as bot:
        found = bot.classify("味道很好")
    assert found.source == "adapter" and found.label in LABEL_SETS["zh"]
