"""The model pipeline on tiny Qwen3-0.6B-style and Qwen2.5-0.5B-Instruct-style checkouts.

    .venv/bin/python -m pytest tests/test_qwen3_convert.py -q

`python -m convert all` turns them into F16, Q8_0 and Q4_K_M files that llama.cpp loads as `qwen3` / `qwen2`
with the real Qwen tokenizer, the generation's own added tokens and chat template; unsupported architectures
and Qwen3 rerankers fail in one line. Byte equality with llama.cpp's converter is in test_reference_converter.
"""
from __future__ import annotations

import json
import shutil

import gguf
import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from conftest import QUANTS, assert_one_line_error, run_convert
from convert.compare import metadata
from tinymodel import TINY_QWEN3_CONFIG, build_checkout, reference_tokenizations

FILE_TYPES = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}
IM_END, ENDOFTEXT, THINK, END_THINK = 151645, 151643, 151667, 151668


def _tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_qwen3_f16_has_qwen3_hparams_and_tensors(tiny_qwen3_models):
    meta = metadata(gguf.GGUFReader(tiny_qwen3_models["F16"]))
    assert meta["general.architecture"] == "qwen3"
    head_dim = TINY_QWEN3_CONFIG["head_dim"]
    assert head_dim != TINY_QWEN3_CONFIG["hidden_size"] // TINY_QWEN3_CONFIG["num_attention_heads"]
    assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == head_dim
    assert meta["qwen3.context_length"] == TINY_QWEN3_CONFIG["max_position_embeddings"]
    tensors = _tensors(tiny_qwen3_models["F16"])
    n_heads, n_kv = TINY_QWEN3_CONFIG["num_attention_heads"], TINY_QWEN3_CONFIG["num_key_value_heads"]
    for i in range(TINY_QWEN3_CONFIG["num_hidden_layers"]):
        assert list(tensors[f"blk.{i}.attn_q_norm.weight"].shape) == [head_dim]
        assert list(tensors[f"blk.{i}.attn_k_norm.weight"].shape) == [head_dim]
        assert tensors[f"blk.{i}.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensors[f"blk.{i}.attn_q.weight"].shape) == [TINY_QWEN3_CONFIG["hidden_size"], n_heads * head_dim]
        assert list(tensors[f"blk.{i}.attn_k.weight"].shape) == [TINY_QWEN3_CONFIG["hidden_size"], n_kv * head_dim]
    assert not [n for n in tensors if n.endswith(".bias")]                  # Qwen3 has no QKV bias
    assert "output.weight" not in tensors                                    # tied, as Qwen3-0.6B


def test_qwen3_tokenizer_gives_llama_cpp_reference_ids(tiny_qwen3_models, vocab_dir):
    model = llama_cpp.Llama(str(tiny_qwen3_models["F16"]), vocab_only=True, verbose=False)
    mismatches = [(text, ids) for text, ids in reference_tokenizations(vocab_dir)
                  if model.tokenize(text.encode("utf-8"), add_bos=False, special=False) != ids]
    assert mismatches == []
    # Qwen3's added tokens are single tokens when parsed as special; <think> is user-defined, not control
    assert model.tokenize(b"<think>", add_bos=False, special=True) == [THINK]
    assert model.tokenize(b"</think>", add_bos=False, special=True) == [END_THINK]
    types = metadata(gguf.GGUFReader(tiny_qwen3_models["F16"]))["tokenizer.ggml.token_type"]
    assert types[THINK] == gguf.TokenType.USER_DEFINED and types[IM_END] == gguf.TokenType.CONTROL


@pytest.mark.parametrize("quant", QUANTS)
def test_each_qwen3_file_loads_and_generates(tiny_qwen3_models, quant):
    path = tiny_qwen3_models[quant]
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == FILE_TYPES[quant]
    model = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    assert model.metadata["general.architecture"] == "qwen3"
    assert model.token_eos() == IM_END
    assert model.metadata["tokenizer.ggml.padding_token_id"] == str(ENDOFTEXT)
    assert "enable_thinking" in model.metadata["tokenizer.chat_template"]
    out = model.create_chat_completion([{"role": "user", "content": "今天天气很好"}], max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_qwen3_chat_template_renders_in_llama_cpp_python(tiny_qwen3_models):
    meta = metadata(gguf.GGUFReader(tiny_qwen3_models["Q4_K_M"]))
    chat = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|endoftext|>")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "你好"}]
    assert chat(messages=messages).prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    # Qwen3's switch for its thinking mode: an empty think block opens the answer
    assert chat(messages=messages, enable_thinking=False).prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # earlier assistant turns lose their think block
    history = messages + [{"role": "assistant", "content": "<think>\nhm\n</think>\n\n好"}, {"role": "user", "content": "再见"}]
    assert "<|im_start|>assistant\n好<|im_end|>\n" in chat(messages=history).prompt


def test_qwen3_untied_sharded_keeps_output_tensor_and_loads(vocab_dir, tmp_path):
    checkout = build_checkout(vocab_dir, tmp_path / "q3-untied", flavour="qwen3", tied=False, shards=3, seed=1)
    r = run_convert("all", str(checkout), "--out", str(tmp_path / "m"), "--types", "F16,Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert "output.weight" in _tensors(tmp_path / "m/q3-untied/q3-untied-F16.gguf")
    llama_cpp.Llama(str(tmp_path / "m/q3-untied/q3-untied-Q4_K_M.gguf"), n_ctx=128, verbose=False)


def test_qwen25_instruct_style_checkout_converts_quantizes_and_chats(vocab_dir, tmp_path):
    checkout = build_checkout(vocab_dir, tmp_path / "q25", flavour="qwen2.5")
    r = run_convert("all", str(checkout), "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    f16 = tmp_path / "m/q25/q25-F16.gguf"
    meta = metadata(gguf.GGUFReader(f16))
    assert meta["general.architecture"] == "qwen2" and "qwen2.attention.key_length" not in meta
    assert "output.weight" not in _tensors(f16)                              # tied, as Qwen2.5-0.5B-Instruct
    assert meta["tokenizer.ggml.token_type"][151657] == gguf.TokenType.USER_DEFINED   # <tool_call>
    model = llama_cpp.Llama(str(tmp_path / "m/q25/q25-Q4_K_M.gguf"), n_ctx=256, verbose=False)
    assert model.token_eos() == IM_END
    chat = Jinja2ChatFormatter(model.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="")
    assert chat(messages=[{"role": "user", "content": "你好"}]).prompt == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    out = model.create_chat_completion([{"role": "user", "content": "你好"}], max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_unsupported_architecture_fails_in_one_line_listing_the_supported_ones(tiny_qwen3_checkout, tmp_path):
    bad = tmp_path / "moe"
    shutil.copytree(tiny_qwen3_checkout, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["Qwen3MoeForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_convert("all", str(bad), "--out", str(tmp_path / "m")), tmp_path / "m",
                           "config.json", "Qwen3MoeForCausalLM", "not supported", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def test_qwen3_reranker_is_refused_in_one_line(tiny_qwen3_checkout, tmp_path):
    # Qwen3-Reranker-0.6B says Qwen3ForCausalLM too; llama.cpp would make a ranking model of it
    bad = tmp_path / "Qwen3-Reranker-0.6B"
    shutil.copytree(tiny_qwen3_checkout, bad)
    assert_one_line_error(run_convert("all", str(bad), "--out", str(tmp_path / "m")), tmp_path / "m",
                           "Qwen3-Reranker-0.6B", "reranker")
