"""The model pipeline on the tiny checkout: tokenizer, end-to-end files, manifest, errors, download."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import gguf
import llama_cpp
import pytest

from conftest import QUANTS, ROOT, assert_one_line_error, run_convert
from fakehub import FakeHub
from tinymodel import build_checkout, reference_tokenizations

FILE_TYPES = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}


def test_tokenizer_gives_llama_cpp_reference_ids(tiny_models, vocab_dir):
    model = llama_cpp.Llama(str(tiny_models["F16"]), vocab_only=True, verbose=False)
    pairs = reference_tokenizations(vocab_dir)
    assert len(pairs) > 40
    mismatches = [(text, ids) for text, ids in pairs
                  if model.tokenize(text.encode("utf-8"), add_bos=False, special=False) != ids]
    assert mismatches == []


@pytest.mark.parametrize("quant", QUANTS)
def test_each_file_loads_and_generates(tiny_models, quant):
    path = tiny_models[quant]
    meta = gguf.GGUFReader(path).fields
    assert meta["general.file_type"].contents() == FILE_TYPES[quant]
    model = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    assert model.metadata["tokenizer.ggml.eos_token_id"] == "151645"          # <|im_end|>
    assert "<|im_start|>" in model.metadata["tokenizer.chat_template"]
    assert model.token_eos() == 151645
    out = model.create_completion("今天天气很好", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_records_inputs_and_outputs_and_rerun_rebuilds_nothing(tiny_checkout, tmp_path):
    assert run_convert("all", str(tiny_checkout), "--out", str(tmp_path)).returncode == 0
    folder = tmp_path / tiny_checkout.name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"] == str(tiny_checkout.resolve())
    inputs = {i["file"]: i["sha256"] for i in manifest["inputs"]}
    assert inputs["model.safetensors"] == _sha256(tiny_checkout / "model.safetensors")
    assert set(manifest["outputs"]) == set(QUANTS)
    for q, entry in manifest["outputs"].items():
        assert entry["sha256"] == _sha256(folder / entry["file"]) and entry["bytes"] > 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    again = run_convert("all", str(tiny_checkout), "--out", str(tmp_path))
    assert again.returncode == 0 and "up to date" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    (folder / f"{tiny_checkout.name}-Q8_0.gguf").unlink()                     # only the missing file comes back
    assert run_convert("all", str(tiny_checkout), "--out", str(tmp_path)).returncode == 0
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert after[f"{tiny_checkout.name}-F16.gguf"] == mtimes[f"{tiny_checkout.name}-F16.gguf"]
    assert after[f"{tiny_checkout.name}-Q8_0.gguf"] != mtimes.get(f"{tiny_checkout.name}-Q8_0.gguf")


def test_untied_sharded_checkout_keeps_output_tensor_and_loads(vocab_dir, tmp_path):
    checkout = build_checkout(vocab_dir, tmp_path / "untied", tied=False, shards=3, dtype="F16", seed=1)
    assert run_convert("all", str(checkout), "--out", str(tmp_path / "m"), "--types", "F16,Q4_K_M").returncode == 0
    f16 = tmp_path / "m/untied/untied-F16.gguf"
    names = {t.name for t in gguf.GGUFReader(f16).tensors}
    assert "output.weight" in names and "token_embd.weight" in names
    assert not (tmp_path / "m/untied/untied-Q8_0.gguf").exists()
    llama_cpp.Llama(str(tmp_path / "m/untied/untied-Q4_K_M.gguf"), n_ctx=128, verbose=False)


def test_tied_checkout_has_no_output_tensor(tiny_models):
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tiny_models["F16"]).tensors}


def _broken_copy(tiny_checkout, tmp_path, name="broken"):
    dst = tmp_path / name
    shutil.copytree(tiny_checkout, dst)
    return dst


def test_other_architecture_is_refused_with_the_file_named(tiny_checkout, tmp_path):
    bad = _broken_copy(tiny_checkout, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_convert("all", str(bad), "--out", str(tmp_path / "m")), tmp_path / "m",
                          "config.json", "LlamaForCausalLM", "not supported")


def test_truncated_safetensors_fails_and_leaves_no_gguf(tiny_checkout, tmp_path):
    bad = _broken_copy(tiny_checkout, tmp_path)
    st = bad / "model.safetensors"
    os.truncate(st, st.stat().st_size // 2)
    assert_one_line_error(run_convert("all", str(bad), "--out", str(tmp_path / "m")), tmp_path / "m",
                          "model.safetensors", "truncated")


def test_missing_tokenizer_fails_before_writing(tiny_checkout, tmp_path):
    bad = _broken_copy(tiny_checkout, tmp_path)
    for f in ("tokenizer.json", "vocab.json"):
        (bad / f).unlink()
    assert_one_line_error(run_convert("all", str(bad), "--out", str(tmp_path / "m")), tmp_path / "m",
                          "tokenizer.json", "vocab.json")


def test_missing_weights_and_missing_folder(tiny_checkout, tmp_path):
    bad = _broken_copy(tiny_checkout, tmp_path)
    (bad / "model.safetensors").unlink()
    assert_one_line_error(run_convert("all", str(bad), "--out", str(tmp_path / "m")), tmp_path / "m", "safetensors")
    assert_one_line_error(run_convert("all", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")),
                          tmp_path / "m", "nowhere")


def _hub_env(hub_url, tmp_path):
    return dict(os.environ, HF_ENDPOINT=hub_url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
                HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")


def test_download_through_hf_endpoint_fetches_only_needed_files(tiny_checkout, tmp_path):
    repo = _broken_copy(tiny_checkout, tmp_path, "repo")
    (repo / "pytorch_model.bin").write_bytes(b"not needed")          # a hub repo often has more than we need
    with FakeHub({"acme/tiny-qwen1.5": repo}) as hub:
        r = run_convert("all", "acme/tiny-qwen1.5", "--out", str(tmp_path / "m"), env=_hub_env(hub.url, tmp_path))
        commit = hub.commits["acme/tiny-qwen1.5"]
        requested = [p for _, p in hub.requests]
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "m/tiny-qwen1.5/manifest.json").read_text())
    assert manifest["source"] == "acme/tiny-qwen1.5" and manifest["revision"] == commit
    assert any(p.endswith("/model.safetensors") for p in requested)
    assert not any("pytorch_model.bin" in p for p in requested)
    for q in QUANTS:
        assert (tmp_path / f"m/tiny-qwen1.5/tiny-qwen1.5-{q}.gguf").is_file()


def test_unreachable_hub_says_how_to_use_a_local_checkout(tmp_path):
    r = run_convert("all", "Qwen/Qwen1.5-0.5B-Chat", "--out", str(tmp_path / "m"),
                    env=_hub_env("http://127.0.0.1:9", tmp_path))
    assert_one_line_error(r, tmp_path / "m", "cannot download Qwen/Qwen1.5-0.5B-Chat", "local checkout", "SRC=")


def test_converter_imports_neither_torch_nor_transformers():
    code = ("import sys, convert.pipeline, convert.hf_to_gguf, convert.download; "
            "sys.exit(int(any(m in sys.modules for m in ('torch', 'transformers'))))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_help_explains_the_steps():
    r = run_convert("--help")
    assert r.returncode == 0
    for word in ("all", "download", "to-gguf", "quantize", "HF_ENDPOINT"):
        assert word in r.stdout
