"""PEFT LoRA adapter -> GGUF LoRA (`python -m convert lora`), on tiny random adapters for the tiny checkouts.

Three tiers: the file (tensor names, shapes, types and values, metadata; a GGUF base gives the same file as its
checkout); llama.cpp applies it exactly as merged weights W + alpha/r * B @ A would act (F32 logits agree to
float rounding) and clearing it restores the base's logits; refusals in one line. With the reference
environment (`make reference-env`; `make test` builds it), llama.cpp's own convert_lora_to_gguf.py converts
the same adapters to byte-identical files.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from conftest import CACHE, run_convert
from convert.compare import differences
from convert.hf_to_gguf import convert_hf_to_gguf
from convert.lora_to_gguf import AdapterError, convert_lora_to_gguf
from allinone_gguf.runtime.quantize import quantize_gguf
from convert.reference_files import reference_lora_converter
from convert.safetensors_np import SafetensorsFile
from tinylora import ATTENTION, MLP, build_adapter, read_adapter
from tinymodel import FLAVOURS, build_checkout, write_safetensors

PROMPT = "今天天气很好，我们去公园散步。"


@pytest.fixture(scope="module")
def adapter(tiny_checkout, tmp_path_factory) -> Path:
    """Rank 8, alpha 16 on q/k/v/o and gate_proj of both layers, float32, with PEFT's model card."""
    return build_adapter(tiny_checkout, tmp_path_factory.mktemp("adapters") / "tiny-sentiment-lora", model_card=True)


@pytest.fixture(scope="module")
def bases(tiny_checkout, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkout as F32 and Q4_K_M GGUF files."""
    out = tmp_path_factory.mktemp("lora-bases")
    f32 = convert_hf_to_gguf(tiny_checkout, out / "tiny-F32.gguf", "F32")
    return {"F32": f32, "Q4_K_M": quantize_gguf(f32, out / "tiny-Q4_K_M.gguf", "Q4_K_M", n_threads=2)}


# -- the file ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outtype", ["F16", "F32"])
def test_lora_gguf_holds_lora_a_and_b_of_each_module(adapter, tiny_checkout, tmp_path, outtype):
    out = convert_lora_to_gguf(adapter, tiny_checkout, tmp_path / "a.gguf", outtype)
    r = gguf.GGUFReader(out)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "qwen2"
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 16.0)
    assert not [k for k in meta if k.startswith(("qwen2.", "tokenizer."))]    # no hyperparameters, no vocabulary
    peft = read_adapter(adapter)
    # PEFT names sort gate_proj (mlp) before self_attn within a layer; each pair is lora_a then lora_b
    order = [f"blk.{i}.{m}.weight.lora_{x}" for i in (0, 1)
             for m in ("ffn_gate", "attn_k", "attn_output", "attn_q", "attn_v") for x in "ab"]
    assert [t.name for t in r.tensors] == order
    hf = {"ffn_gate": "mlp.gate_proj", "attn_k": "self_attn.k_proj", "attn_output": "self_attn.o_proj",
          "attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj"}
    np_type = np.float16 if outtype == "F16" else np.float32
    for t in r.tensors:
        blk, i, m, _, half = t.name.split(".")
        want = peft[f"base_model.model.model.layers.{i}.{hf[m]}.lora_{half[-1].upper()}.weight"].astype(np_type)
        assert t.tensor_type.name == outtype
        assert t.data.shape == want.shape            # untransposed: lora_a (r, in), lora_b (out, r)
        assert np.array_equal(t.data, want)


def test_gguf_base_gives_the_same_file_as_its_checkout(adapter, tiny_checkout, bases, tmp_path):
    a = run_convert("lora", str(adapter), str(tiny_checkout), str(tmp_path / "from-checkout.gguf"))
    b = run_convert("lora", str(adapter), str(bases["Q4_K_M"]), str(tmp_path / "from-gguf.gguf"))
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path / "from-checkout.gguf").read_bytes() == (tmp_path / "from-gguf.gguf").read_bytes()
    # like llama.cpp's converter, config.json alone will do (then nothing checks the shapes)
    config_only = tmp_path / tiny_checkout.name
    config_only.mkdir()
    shutil.copy(tiny_checkout / "config.json", config_only)
    convert_lora_to_gguf(adapter, config_only, tmp_path / "from-config.gguf")
    assert (tmp_path / "from-config.gguf").read_bytes() == (tmp_path / "from-gguf.gguf").read_bytes()


# -- llama.cpp applies it --------------------------------------------------------------------------------------
def last_logits(model: Path, lora: Path | None = None, scales=(None,)) -> list[np.ndarray]:
    """Logits after PROMPT on one context, once per scale: None runs without adapters (llama.cpp's per-context
    adapter API switches them between decodes, as the runtime will)."""
    llm = llama_cpp.Llama(str(model), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    tokens = llm.tokenize(PROMPT.encode("utf-8"), add_bos=False)
    handle = llama_cpp.llama_adapter_lora_init(llm.model, str(lora).encode("utf-8")) if lora else None
    assert handle or not lora, f"llama.cpp could not load {lora}"
    rows = []
    for scale in scales:
        if scale is None:
            assert llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None) == 0
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            assert llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, (ctypes.c_float * 1)(scale)) == 0
        llm.reset()
        llm.eval(tokens)
        rows.append(np.array(llm.scores[len(tokens) - 1]))
    llm.close()
    return rows


def merged_checkout(checkout: Path, adapter: Path, out: Path, scale: float) -> Path:
    """The checkout with the adapter merged in, W + scale * B @ A, as float32."""
    out.mkdir(parents=True)
    for f in checkout.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    weights = {t.name: np.concatenate(list(t.rows())).reshape(t.shape)
               for t in SafetensorsFile(checkout / "model.safetensors").tensors}
    lora = read_adapter(adapter)
    for name, a in lora.items():
        if name.endswith(".lora_A.weight"):
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            weights[module + ".weight"] += scale * (lora[name.replace("lora_A", "lora_B")] @ a)
    write_safetensors(out / "model.safetensors", weights, "F32")
    return out


def test_llama_cpp_applies_the_adapter_as_merged_weights_would(adapter, tiny_checkout, bases, tmp_path):
    lora = convert_lora_to_gguf(adapter, bases["F32"], tmp_path / "lora-F32.gguf", "F32")
    base, with_lora, cleared = last_logits(bases["F32"], lora, scales=(None, 1.0, None))
    merged = convert_hf_to_gguf(merged_checkout(tiny_checkout, adapter, tmp_path / "merged", 16 / 8),
                                tmp_path / "merged-F32.gguf", "F32")
    (want,) = last_logits(merged)
    effect = np.abs(with_lora - base).max()
    assert effect > 0.3                                    # the adapter matters...
    assert np.abs(with_lora - want).max() < 1e-4 * effect  # ...exactly as alpha/r * B @ A added to W
    assert np.array_equal(cleared, base)                   # and clearing it restores the base model


def test_f16_adapter_on_q4_k_m_base_changes_logits_and_scale_zero_does_not(adapter, bases, tmp_path):
    lora = convert_lora_to_gguf(adapter, bases["Q4_K_M"], tmp_path / "lora-F16.gguf")
    base, with_lora, zero = last_logits(bases["Q4_K_M"], lora, scales=(None, 1.0, 0.0))
    assert np.abs(with_lora - base).max() > 0.3
    assert np.allclose(zero, base, atol=1e-5)


# -- refusals ---------------------------------------------------------------------------------------------------
CONFIG_REFUSALS = {
    "dora": ({"use_dora": True}, "DoRA"),
    "rslora": ({"use_rslora": True}, "use_rslora"),
    "alpha-pattern": ({"alpha_pattern": {"model.layers.0.self_attn.q_proj": 32}}, "one alpha"),
    "modules-to-save": ({"modules_to_save": ["score"]}, "modules_to_save"),
    "ia3": ({"peft_type": "IA3"}, "only LORA"),
    "lora-bias": ({"lora_bias": True}, "lora_bias"),
}


@pytest.mark.parametrize("case", list(CONFIG_REFUSALS))
def test_unsupported_adapter_configs_are_refused(case, tiny_checkout, tmp_path):
    extra, words = CONFIG_REFUSALS[case]
    folder = build_adapter(tiny_checkout, tmp_path / case, targets=("q_proj",), extra=extra)
    with pytest.raises(AdapterError, match=words):
        convert_lora_to_gguf(folder, tiny_checkout, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _rewrite(folder: Path, change) -> Path:
    tensors = read_adapter(folder)
    change(tensors)
    write_safetensors(folder / "adapter_model.safetensors", dict(sorted(tensors.items())), "F32")
    return folder


def _config_only(tmp_path: Path, flavour: str, **changes) -> Path:
    """A folder with only a tiny flavour's config.json, for adapters made for another model."""
    folder = tmp_path / f"config-{flavour}"
    folder.mkdir()
    config = {**FLAVOURS[flavour]["config"], **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_adapters_that_do_not_fit_the_base_are_refused(tiny_checkout, bases, tmp_path):
    def refused(folder: Path, words: str, base: Path = tiny_checkout) -> None:
        with pytest.raises(AdapterError, match=words):
            convert_lora_to_gguf(folder, base, tmp_path / "x.gguf")

    qwen3 = build_adapter(_config_only(tmp_path, "qwen3"), tmp_path / "for-qwen3", targets=("q_proj",))
    refused(qwen3, "another model", bases["Q4_K_M"])                  # q_proj (512, 256) vs the base's (256, 256)
    deeper = build_adapter(_config_only(tmp_path, "qwen1.5", num_hidden_layers=3), tmp_path / "deeper",
                           targets=("q_proj",), layers=[2])
    refused(deeper, "no place in a 2-layer qwen2")
    refused(build_adapter(tiny_checkout, tmp_path / "lm-head", targets=("lm_head",)), "tied to the embeddings")
    dora = _rewrite(build_adapter(tiny_checkout, tmp_path / "dora", targets=("q_proj",)), lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(256, np.float32)}))
    refused(dora, "not a lora_A/lora_B")
    half = _rewrite(build_adapter(tiny_checkout, tmp_path / "half", targets=("q_proj",)),
                    lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"))
    refused(half, "blk.1.attn_q.weight has a lora_A but no lora_B")
    ok = build_adapter(tiny_checkout, tmp_path / "ok", targets=("q_proj",))
    refused(ok, "not a base model", convert_lora_to_gguf(ok, tiny_checkout, tmp_path / "ok.gguf"))


def test_cli_refusal_is_one_line(tiny_checkout, tmp_path):
    folder = build_adapter(tiny_checkout, tmp_path / "dora", targets=("q_proj",), extra={"use_dora": True})
    r = run_convert("lora", str(folder), str(tiny_checkout), str(tmp_path / "x.gguf"))
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "use_dora=False" in r.stderr


# -- the reference -----------------------------------------------------------------------------------------------
REFERENCE_VARIANTS = {
    # name: (checkout flavour and options, adapter options, outtype)
    "qwen1.5-attn-gate-f32-card-f16": ({}, dict(model_card=True), "F16"),
    "qwen1.5-layer1-rank-pattern-f16-reversed-f32": (
        {}, dict(targets=ATTENTION + MLP, r=16, alpha=32, dtype="F16", layers=[1], file_order="reversed",
                 rank_pattern={"model.layers.1.mlp.down_proj": 4}), "F32"),
    "qwen3-untied-all-embed-lm-head-alora-bf16-f16": (
        dict(flavour="qwen3", tied=False, seed=1),
        dict(targets=ATTENTION + MLP + ("embed_tokens", "lm_head"), dtype="BF16",
             extra={"alora_invocation_tokens": [151644, 77091]}), "F16"),
}


@pytest.fixture(scope="module")
def reference_checkouts(tiny_checkout, vocab_dir, tmp_path_factory):
    made = {}

    def get(options: dict) -> Path:
        if not options:
            return tiny_checkout
        key = json.dumps(options, sort_keys=True)
        if key not in made:
            made[key] = build_checkout(vocab_dir, tmp_path_factory.mktemp("ref-lora") / "tiny-base", **options)
        return made[key]
    return get


@pytest.mark.parametrize("variant", list(REFERENCE_VARIANTS))
def test_same_lora_gguf_as_reference_converter(variant, reference_checkouts, tmp_path, reference_python):
    checkout_options, adapter_options, outtype = REFERENCE_VARIANTS[variant]
    checkout = reference_checkouts(checkout_options)
    folder = build_adapter(checkout, tmp_path / f"{variant}-lora", **adapter_options)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    r = run_convert("lora", str(folder), str(checkout), str(ours), "--outtype", outtype)
    assert r.returncode == 0, r.stderr
    script = reference_lora_converter(CACHE / "vocab")
    p = subprocess.run([str(reference_python), str(script), str(folder), "--base", str(checkout),
                        "--outtype", outtype.lower(), "--outfile", str(ref)],
                       capture_output=True, text=True, timeout=600, cwd=script.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    assert differences(str(ours), str(ref), include_general=True) == []
    assert ours.read_bytes() == ref.read_bytes()
