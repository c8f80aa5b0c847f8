"""The sentiment adapter: made by `python -m allinone_gguf tune`, applied by the runtime to the sentiment role only.

Tiny random-weight model with the real Qwen tokenizer (conftest). The training tests need the tuning environment
(`make tune-env`; `make test` builds it, and then a missing one fails them instead of skipping); the byte-identity
test also needs the reference environment, as tests/test_lora_convert.py does.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from allinone_gguf.measure.evaluate import HELD_OUT_INJECTIONS, INJECTION
from allinone_gguf.runtime import AdapterError, AllInOne
from allinone_gguf.runtime import adapter as adapter_module
from allinone_gguf.runtime.adapter import (WEIGHTS_KEY, adapter_files, file_sha256, model_family, weights_digest,
                                           weights_identity, write_metadata)
from allinone_gguf.runtime.prompts import LABEL_SETS
from allinone_gguf.tune.config import TuneSettings
from allinone_gguf.tune.data import TRAIN_INJECTIONS, build_examples, inject
from allinone_gguf.tune.memory import (checkout_shape, cpu_has_bf16, estimate_peak_gb, pick_batch,
                                      pick_precision_and_batch, resolve_base_dtype)
from allinone_gguf.tune.run import fit_temperature, no_bf16_hint
from conftest import CACHE, QUANTS, ROOT, need, run_convert
from convert.compare import differences
from convert.reference_files import reference_lora_converter
from tinylora import build_adapter
from tinymodel import build_checkout

TUNE_PYTHON = Path(os.environ.get("ALLINONE_TUNE_PYTHON", ROOT / ".venv-tune/bin/python"))
TRAINER = ROOT / "allinone_gguf/tune/train_lora.py"
PRODUCTS = ROOT / "allinone_gguf/tune/products.py"
# Short texts written for these tests (the sentiment data is never copied into the project).
TEXTS = [(1, "味道很好，下次还来。"), (0, "送餐太慢了，菜都凉了。"), (1, "服务热情，环境干净。"),
         (0, "质量很差，用了一天就坏了。"), (1, "物流很快，包装完好，满意。"), (0, "客服态度恶劣，再也不买了。"),
         (1, "这本书写得真好，推荐。"), (0, "剧情拖沓，看不下去。")]


def need_tune_env() -> None:
    need(TUNE_PYTHON, "tuning environment", "tune-env")     # a failure under `make test`, which builds it


def write_csv(path: Path, rows: list[tuple[int, str]]) -> Path:
    path.write_text("label,text\n" + "".join(f"{y},{t}\n" for y, t in rows), encoding="utf-8")
    return path


@pytest.fixture()
def model(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny Q8_0 model, so adapters written beside it touch no other test."""
    dst = tmp_path / "tiny" / "tiny-Q8_0.gguf"
    dst.parent.mkdir()
    shutil.copy(tiny_models["Q8_0"], dst)
    return dst


def install_adapter(model: Path, checkout: Path, tmp_path: Path, *, temperature: float = 1.0, **meta) -> Path:
    """A random (non-zero) PEFT adapter for the tiny checkout, converted by our converter and described as
    `tune` would describe it, beside `model`."""
    peft = build_adapter(checkout, tmp_path / "peft", seed=3)
    gguf, meta_path = adapter_files(model)
    r = run_convert("lora", str(peft), str(checkout), str(gguf))
    assert r.returncode == 0, r.stderr
    with AllInOne(model, sentiment_adapter="off", sentiment_prompt="guide", parallel=1, n_ctx=1024) as bot:
        _, _, digest = bot.sentiment_inputs(["x"])
    write_metadata(meta_path, {"base_weights": weights_identity(model), "base_file": model.name,
                               "base_sha256": file_sha256(model), "labels": "zh",
                               "label_set": ["正面", "负面"], "prompt": "guide", "frame_sha256": digest,
                               "temperature": temperature, **meta})
    return gguf


# -- data ---------------------------------------------------------------------------------------------------------
def test_training_injections_are_not_the_ones_evaluate_measures():
    for lang, templates in TRAIN_INJECTIONS.items():
        for _, template in templates:
            for probe in [t for ts in HELD_OUT_INJECTIONS.values() for _, t in ts]:
                assert probe.format(label="").strip() not in template.format(label="")


def test_an_injection_is_mostly_in_the_texts_language_and_asks_for_the_wrong_label_in_its_own_words():
    rng = random.Random(1)
    for text, label, own in (("菜很好吃。", 1, "zh"), ("A dull, joyless film.", 0, "en")):
        languages = []
        for _ in range(400):
            injected, (where, template) = inject(text, label, rng)
            lang = next(k for k, ts in TRAIN_INJECTIONS.items() if (where, template) in ts)
            languages.append(lang)
            wrong = LABEL_SETS[lang][1 if label == 1 else 0]
            assert injected == (text + template.format(label=wrong) if where == "after"
                                else template.format(label=wrong) + text)
        assert 0.6 < languages.count(own) / len(languages) < 0.9       # 3 of 4 in the text's own language


def test_examples_are_seeded_balanced_held_apart_and_injected_copies_keep_their_label(tmp_path):
    rows = [(i % 2, f"第{i}条评论，{'好' if i % 2 else '差'}。") for i in range(60)]
    data = write_csv(tmp_path / "a.csv", rows)
    ex, record = build_examples([data], texts=20, held=6, inject_share=0.5, seed=7)
    again, _ = build_examples([data], texts=20, held=6, inject_share=0.5, seed=7)
    other, _ = build_examples([data], texts=20, held=6, inject_share=0.5, seed=8)
    assert ex == again and ex != other
    held = [e for e in ex if e.split == "held"]
    plain = [e for e in ex if e.split == "train" and not e.injected]
    assert len(held) == 6 and len(plain) == 20
    assert {e.text for e in held}.isdisjoint(e.text for e in plain)
    assert sum(e.label for e in held) == 3 and sum(e.label for e in plain) == 10
    truth = dict((t, y) for y, t in rows)
    for e in ex:
        if e.injected:
            original = next(t for t in truth if t in e.text)
            assert e.label == truth[original] and e.text != original
    assert record[0]["train_texts"] == 20 and record[0]["injected_copies"] == sum(e.injected for e in ex) > 0


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = random.Random(0)
    margins = [rng.uniform(-8, 8) for _ in range(4000)]
    # labels drawn from sigmoid(margin / 2.5): the fitted temperature must come out near 2.5
    labels = [int(rng.random() < 1 / (1 + pow(2.718281828, -m / 2.5))) for m in margins]
    assert abs(fit_temperature(margins, labels) - 2.5) < 0.25


# -- runtime ------------------------------------------------------------------------------------------------------
def test_adapter_changes_the_sentiment_only_and_replies_stay_identical(model, tiny_checkout, tmp_path):
    install_adapter(model, tiny_checkout, tmp_path, temperature=2.0)
    texts = [t for _, t in TEXTS]
    with AllInOne(model, sentiment_adapter="off", sentiment_prompt="guide", n_ctx=1024, seed=5) as bot:
        plain = bot.classify_many(texts)
        plain_reply = bot.reply("今天心情很好", max_tokens=24)
    with AllInOne(model, n_ctx=1024, seed=5, sentiment_cache=0) as bot:   # auto: the adapter; decoded each time
        assert bot.sentiment_adapter is not None and bot.sentiment_adapter.temperature == 2.0
        tuned = bot.classify_many(texts)
        # texts classified while the reply streams: their batches carry the adapter, the reply's must not
        stream = bot.stream_reply("今天心情很好", max_tokens=24)
        pieces, during = [next(stream)], []
        worker = threading.Thread(target=lambda: during.extend(bot.classify_many(texts)))
        worker.start()
        pieces += list(stream)
        worker.join(60)
        steps = bot.stats()["batches"]
    assert {s.source for s in plain} == {"grammar"} and {s.source for s in tuned} == {"adapter"}
    # the adapter moved the margins (beyond the temperature's scaling)
    assert max(abs(a.margin * 2.0 - b.margin) for a, b in zip(tuned, plain)) > 0.05
    assert "".join(pieces) == plain_reply
    # the same answers (up to float rounding: the cells they sit in differ while a reply holds others)
    assert [s.source for s in during] == ["adapter"] * len(texts)
    assert max(abs(a.margin - b.margin) for a, b in zip(during, tuned)) < 2e-3
    assert steps > 0


def test_respond_with_the_adapter_reads_the_label_first_then_decodes_the_prompt_and_its_cue_at_once(
        model, tiny_checkout, tmp_path):
    install_adapter(model, tiny_checkout, tmp_path)
    with AllInOne(model, n_ctx=1024, seed=5, sentiment_cache=0) as bot:
        before = bot.stats()
        with bot.respond("送餐太慢了，菜都凉了。", max_tokens=8, temperature=0) as stream:
            label = stream.sentiment()
            reply = "".join(stream)
        after = bot.stats()
    with AllInOne(model, sentiment_adapter="off", n_ctx=1024, seed=5) as plain:
        known = "".join(plain.stream_reply("送餐太慢了，菜都凉了。", sentiment=label, max_tokens=8, temperature=0))
    assert label.source == "adapter"
    assert reply == known        # the reply's batches never carried the LoRA, and its cue is the label's
    # llama_decode calls: the label (with the LoRA), the prompt with the cue, then one per token after the first
    assert after["batches"] - before["batches"] == 2 + stream.usage["completion_tokens"] - \
        (stream.finish_reason == "length")


def test_off_ignores_the_adapter_and_auto_without_one_is_the_grammar(model, tiny_checkout, tmp_path):
    with AllInOne(model, n_ctx=1024) as bot:
        assert bot.sentiment_adapter is None and bot.classify("好").source == "grammar"
    install_adapter(model, tiny_checkout, tmp_path)
    with AllInOne(model, n_ctx=1024, sentiment_adapter="off") as bot:
        assert bot.sentiment_adapter is None and bot.classify("好").source == "grammar"
    with AllInOne(model, n_ctx=1024, labels="en") as bot:    # one adapter serves both label sets, read in its frame
        en, zh = bot.classify("good"), bot.classify("good", labels="zh")
        assert (en.source, zh.source) == ("adapter", "adapter") and en.label in ("Positive", "Negative")
        assert en.margin == pytest.approx(zh.margin, abs=1e-4) and en.is_positive == zh.is_positive


def test_adapter_for_other_weights_or_another_frame_is_refused(model, tiny_checkout, tiny_models, tmp_path):
    gguf = install_adapter(model, tiny_checkout, tmp_path, base_weights="checkout:" + "0" * 64)
    with pytest.raises(AdapterError, match=r"was made for other weights \(tiny-Q8_0.gguf: checkout:000"):
        AllInOne(model, n_ctx=1024).classify("好")
    meta = json.loads(adapter_files(model)[1].read_text(encoding="utf-8"))
    write_metadata(adapter_files(model)[1], {**{k: v for k, v in meta.items() if k != "format"},
                                             "base_weights": weights_identity(model), "frame_sha256": "1" * 64})
    with pytest.raises(AdapterError, match="another prompt frame"):
        AllInOne(model, n_ctx=1024).classify("好")
    # the same adapter named explicitly for the F16 of the same weights: the weights pass, the frame does not
    with pytest.raises(AdapterError, match="another prompt frame"):
        AllInOne(tiny_models["F16"], n_ctx=1024, sentiment_adapter=str(gguf)).classify("好")
    # and a user of the CLI gets one line, not a traceback
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "classify", "-", "--model", str(model)],
                       input="好\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "prompt frame" in r.stderr, r.stderr


# -- one adapter for every quantization of the same weights ---------------------------------------------------------
@pytest.fixture()
def family(tiny_models, tmp_path) -> dict[str, Path]:
    """Private copies of the tiny model's F16, Q8_0 and Q4_K_M in one folder, as `make models` lays them out."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    return {q: shutil.copy(tiny_models[q], folder / f"tiny-{q}.gguf") for q in QUANTS}


def other_checkout_f16(vocab_dir: Path, tmp_path: Path) -> Path:
    """The F16 of a second tiny checkout: same shapes and tokenizer, other (seeded) weights."""
    checkout = build_checkout(vocab_dir, tmp_path / "hf" / "other", seed=7)
    out = tmp_path / "other" / "other-F16.gguf"
    r = run_convert("to-gguf", str(checkout), str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("name, expected", [("m-Q4_K_M.gguf", "m"), ("tiny-qwen1.5-F16.gguf", "tiny-qwen1.5"),
                                            ("qwen2.5-0.5b-instruct-q8_0.gguf", "qwen2.5-0.5b-instruct"),
                                            ("Qwen3-0.6B-BF16.gguf", "Qwen3-0.6B"), ("x.IQ4_XS.gguf", "x"),
                                            ("model.gguf", "model"), ("Qwen1.5-0.5B-Chat.gguf", "Qwen1.5-0.5B-Chat")])
def test_model_family_drops_the_quantization_suffix_only(name, expected):
    assert model_family(Path("models") / name) == expected


def test_every_quantization_carries_the_checkouts_weights_identity(tiny_models, tiny_checkout, vocab_dir, tmp_path):
    expected = "checkout:" + weights_digest({"model.safetensors": file_sha256(tiny_checkout / "model.safetensors")})
    assert {q: weights_identity(tiny_models[q]) for q in QUANTS} == {q: expected for q in QUANTS}
    other = other_checkout_f16(vocab_dir, tmp_path)
    assert weights_identity(other).startswith("checkout:") and weights_identity(other) != expected
    # a GGUF without our key (another tool's): the quantization-proof tensors stand in, the same for every
    # quantization, another for other weights (the key renamed in place keeps every offset)
    keyless = {}
    for q, path in [*tiny_models.items(), ("other", other)]:
        keyless[q] = tmp_path / f"keyless-{q}.gguf"
        keyless[q].write_bytes(path.read_bytes().replace(WEIGHTS_KEY.encode(), b"x" * len(WEIGHTS_KEY), 1))
    ids = {q: weights_identity(p) for q, p in keyless.items()}
    assert ids["F16"] == ids["Q8_0"] == ids["Q4_K_M"] != ids["other"] and ids["F16"].startswith("tensors:")


def test_one_adapter_serves_every_quantization_without_hashing_the_model(family, tiny_checkout, tmp_path,
                                                                        monkeypatch):
    gguf = install_adapter(family["Q4_K_M"], tiny_checkout, tmp_path, temperature=2.0)
    assert gguf.name == "tiny.sentiment-lora.gguf" and gguf.parent == family["F16"].parent

    def no_hash(path):
        raise AssertionError(f"{path} hashed at start")
    monkeypatch.setattr(adapter_module, "file_sha256", no_hash)
    for q, path in family.items():
        with AllInOne(path, n_ctx=1024) as bot:         # auto: the family's adapter
            assert bot.sentiment_adapter.path == gguf, q
            found = bot.classify_many([t for _, t in TEXTS])
        assert {s.source for s in found} == {"adapter"} and {s.label for s in found} <= set(bot.label_set()), q


def test_adapter_from_other_weights_is_refused_in_one_line(family, tiny_checkout, vocab_dir, tmp_path):
    gguf = install_adapter(family["Q8_0"], tiny_checkout, tmp_path)
    other = other_checkout_f16(vocab_dir, tmp_path)
    with pytest.raises(AdapterError, match=r"made for other weights \(tiny-Q8_0.gguf: checkout:.*than other-F16"):
        AllInOne(other, n_ctx=1024, sentiment_adapter=str(gguf)).classify("好")
    for f in adapter_files(family["Q8_0"]):                     # found by auto beside the other model: refused
        shutil.copy(f, adapter_files(other)[0].with_suffix(f.suffix))
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "classify", "-", "--model", str(other)],
                       input="好\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "made for other weights" in r.stderr, r.stderr


def test_older_adapters_keep_their_name_and_their_one_file(family, tiny_checkout, tmp_path):
    """Metadata from before the weights' identity (base_sha256 only), under the older <model>.sentiment-lora name:
    found and accepted for the file it was made for (hashed, as before), refused by its siblings with a hint."""
    gguf = install_adapter(family["Q8_0"], tiny_checkout, tmp_path)
    old_gguf, old_meta = adapter_files(family["Q8_0"], family=False)
    meta = json.loads(adapter_files(family["Q8_0"])[1].read_text(encoding="utf-8"))
    write_metadata(old_meta, {k: v for k, v in meta.items() if k not in ("format", "base_weights")})
    gguf.rename(old_gguf)
    adapter_files(family["Q8_0"])[1].unlink()
    with AllInOne(family["Q8_0"], n_ctx=1024) as bot:
        assert bot.sentiment_adapter.path == old_gguf and bot.classify("好").source == "adapter"
    with AllInOne(family["F16"], n_ctx=1024) as bot:             # auto finds no adapter of its own
        assert bot.sentiment_adapter is None
    with pytest.raises(AdapterError, match="made for the file tiny-Q8_0.gguf alone.*tune it again"):
        AllInOne(family["F16"], n_ctx=1024, sentiment_adapter=str(old_gguf)).classify("好")


# -- training -----------------------------------------------------------------------------------------------------
# the LoRA on every layer (checkpointed) in fp32; on the top layer only, the bf16 base weights multiplied in fp32
# (what a CPU without bf16 arithmetic runs)
@pytest.mark.parametrize("layers, base", [(0, "fp32"), (1, "bf16")])
def test_shared_prefix_training_margins_equal_whole_text_ones(layers, base, tiny_checkout, model, tmp_path):
    need_tune_env()
    with AllInOne(model, sentiment_adapter="off", sentiment_prompt="guide", n_ctx=1024) as bot:
        ids, label_ids, _ = bot.sentiment_inputs([t for _, t in TEXTS])
    n = len(os.path.commonprefix(ids))
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"prefix": ids[0][:n], "label_ids": [list(x) for x in label_ids]}) + "\n" + "".join(
        json.dumps({"rest": t[n:], "label": y, "split": "train"}) + "\n" for t, (y, _) in zip(ids, TEXTS)))
    r = subprocess.run([str(TUNE_PYTHON), str(TRAINER), "--checkout", str(tiny_checkout), "--inputs", str(inputs),
                        "--out", str(tmp_path / "x"), "--self-check", "--precision", "fp32", "--base-dtype", base,
                        "--pad-to", "8",      # tune's padding (to a multiple of 8 tokens) is in the shared path
                        "--layers", str(layers)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] < 1e-4 and len(result["shared"]) == 6
    assert result["grad_rel_diff"] < 1e-4       # gradients too, through the checkpointed (recomputed) layers
    assert max(abs(x) for x in result["shared"]) > 1e-3     # margins that are not all zero
    assert result["adapted_layers"] == ([0, 1] if layers == 0 else [1])     # the tiny model has 2 layers
    assert (result["fp32_linear_diff"] is None) == (base == "fp32")
    if base == "bf16":
        assert result["fp32_linear_diff"] < 1e-4        # output and input gradient of the upcast product


LOAD_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import train_lora as t
checkout = sys.argv[2]
config = t.checkout_config(checkout)
ours = t.load_base(checkout, config, torch.float32, "eager")
plain = t.AutoModelForCausalLM.from_pretrained(checkout, config=config, dtype=torch.float32,
                                               attn_implementation="eager")
a, b = dict(ours.named_parameters()), dict(plain.named_parameters())
ids = torch.tensor([[1, 2, 3, 40, 500]])
print(sorted({str(p.dtype) for n, p in a.items() if "embed" in n or "lm_head" in n}), sorted(a) == sorted(b),
      all(torch.equal(a[n].float(), b[n]) for n in a),
      torch.equal(ours.model(input_ids=ids).last_hidden_state, plain.model(input_ids=ids).last_hidden_state))
"""


def test_fp32_weights_are_read_tensor_by_tensor_to_the_same_numbers(vocab_dir, tmp_path):
    # load_base: fp32 weights from a bf16 checkout without holding the whole mapped file (the embeddings and the
    # head kept bf16); the same numbers and hidden states as transformers' own fp32 loading, over two shards
    need_tune_env()
    checkout = build_checkout(vocab_dir, tmp_path / "untied", tied=False, shards=2)
    r = subprocess.run([str(TUNE_PYTHON), "-c", LOAD_CHECK, str(TRAINER.parent), str(checkout)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "['torch.bfloat16'] True True True"


@pytest.fixture(scope="module")
def tuned(tiny_models, tiny_checkout, tmp_path_factory):
    """`python -m allinone_gguf tune` end to end on the tiny model: (model, metadata, seconds, process)."""
    need_tune_env()
    tmp = tmp_path_factory.mktemp("tuned")
    model = tmp / "tiny-Q8_0.gguf"
    shutil.copy(tiny_models["Q8_0"], model)
    data = write_csv(tmp / "train.csv", TEXTS * 3)
    dev = write_csv(tmp / "dev.csv", TEXTS)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "tune", str(model), "--data", str(data), "--dev",
                        str(dev), "--hf", str(tiny_checkout), "--texts", "16", "--held", "6", "--batch", "4",
                        "--threads", "2", "--work", str(tmp / "work")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads(adapter_files(model)[1].read_text(encoding="utf-8"))
    return model, meta, seconds, r, tmp


def test_tune_end_to_end_writes_an_adapter_the_runtime_uses(tuned):
    model, meta, seconds, r, tmp = tuned
    gguf, _ = adapter_files(model)
    assert meta["base_sha256"] == file_sha256(model) and meta["prompt"] == "guide" and meta["labels"] == "zh"
    assert meta["base_weights"] == weights_identity(model) and gguf.name == "tiny.sentiment-lora.gguf"
    assert meta["adapter_sha256"] == file_sha256(gguf) and meta["temperature"] > 0
    assert meta["training"]["files"][0]["sha256"] == file_sha256(tmp / "train.csv")
    files = meta["training"]["files"]
    assert files[0]["train_texts"] == 16 and files[0]["held_texts"] == 6 and meta["training"]["steps"] > 0
    assert set(meta["dev"]["dev.csv"]) >= {"accuracy", "recall"} and meta["dev"]["dev.csv"]["source"] == "adapter"
    # the raw margins behind the temperature and the dev figures are kept for comparing calibrations
    margins = json.loads((tmp / "work" / "margins.json").read_text(encoding="utf-8"))
    assert len(margins["held"]) == 6 and {source for source, _, _ in margins["held"]} == {"train.csv"}
    assert meta["temperature"] == fit_temperature([m for _, _, m in margins["held"]], [y for _, y, _ in margins["held"]])
    assert len(margins["dev"]["dev.csv"]) == len(TEXTS)
    assert "tune:" in r.stderr and "wrote" in r.stderr          # progress bar and summary on stderr
    # where the time went, each step's wall seconds, adding up to the run's minutes (printed as well)
    assert set(meta["phase_seconds"]) == {"inputs", "trainer", "convert", "held_back", "dev"}
    assert abs(sum(meta["phase_seconds"].values()) / 60 - meta["minutes"]) < 0.1 and "time: " in r.stderr
    # the held-back texts' accuracy per training file, as the margins kept for them say (and printed)
    held = margins["held"]
    right = [(m > 0) == bool(y) for _, y, m in held]
    assert meta["held_back_accuracy"] == {"train.csv": round(sum(right) / len(right), 4)} and len(held) == 6
    assert "train.csv: " in r.stderr and "on 6 texts it never trained on" in r.stderr
    with AllInOne(model, n_ctx=1024) as bot:
        s = bot.classify("味道很好")
    assert s.source == "adapter" and abs(sum(s.probs.values()) - 1) < 1e-6


def test_trained_adapter_converts_byte_identical_to_the_reference(tuned, tiny_checkout, tmp_path, reference_python):
    *_, tmp = tuned
    peft = tmp / "work" / "peft"
    ref = tmp_path / "ref.gguf"
    script = reference_lora_converter(CACHE / "vocab")
    p = subprocess.run([str(reference_python), str(script), str(peft), "--base", str(tiny_checkout),
                        "--outtype", "f16", "--outfile", str(ref)],
                       capture_output=True, text=True, timeout=600, cwd=script.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = adapter_files(tuned[0])[0]
    assert differences(str(ours), str(ref), include_general=True) == []
    assert ours.read_bytes() == ref.read_bytes()


def write_inputs(model: Path, path: Path, texts: int, held: int = 8) -> Path:
    """inputs.jsonl as `tune` writes it, for `texts` short texts (the first `held` held back)."""
    rows = [(i % 2, f"第{i}条：{'很满意' if i % 2 else '很失望'}") for i in range(texts)]
    with AllInOne(model, sentiment_adapter="off", sentiment_prompt="guide", n_ctx=1024) as bot:
        ids, label_ids, _ = bot.sentiment_inputs([t for _, t in rows])
    n = len(os.path.commonprefix(ids))
    path.write_text(json.dumps({"prefix": ids[0][:n], "label_ids": [list(x) for x in label_ids]}) + "\n" + "".join(
        json.dumps({"rest": t[n:], "label": y, "split": "held" if i < held else "train"}) + "\n"
        for i, (t, (y, _)) in enumerate(zip(ids, rows))))
    return path


def test_ctrl_c_stops_training_and_keeps_the_best_checkpoint(tiny_checkout, model, tmp_path):
    need_tune_env()
    inputs = write_inputs(model, tmp_path / "inputs.jsonl", 400)
    out = tmp_path / "peft"
    proc = subprocess.Popen([str(TUNE_PYTHON), str(TRAINER), "--checkout", str(tiny_checkout), "--inputs",
                             str(inputs), "--out", str(out), "--batch", "1", "--epochs", "20", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    while "tune:" not in seen or "/7840" not in seen:       # the bar is up and counting
        assert time.monotonic() < deadline, seen[-2000:]
        seen += proc.stderr.read(64)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, rest[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["interrupted"] and 0 < log["steps"] < log["steps_planned"] and log["best"]["n"] == 8
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_tune_without_its_environment_or_checkout_says_what_to_do(model, tmp_path):
    data = write_csv(tmp_path / "t.csv", TEXTS)
    env = {**os.environ, "ALLINONE_TUNE_PYTHON": str(tmp_path / "nowhere/python")}
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "tune", str(model), "--data", str(data)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "make tune-env" in r.stderr and "Traceback" not in r.stderr
    env["ALLINONE_TUNE_PYTHON"] = sys.executable       # an environment, no manifest / --hf, and in the way of
    (model.with_name(model.name[:-5] + "-hf") / "mine").mkdir(parents=True)   # the checkout rebuilt from the GGUF
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "tune", str(model), "--data", str(data)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "--hf" in r.stderr and "Traceback" not in r.stderr


def test_bench_adapter_reports_both_paths_side_by_side(model, tiny_checkout, tmp_path):
    install_adapter(model, tiny_checkout, tmp_path)
    data = write_csv(tmp_path / "dev.csv", TEXTS)
    r = subprocess.run([sys.executable, "-m", "allinone_gguf.measure.bench_adapter", str(model), "--data", str(data),
                        "--threads", "2", "--out", str(tmp_path / "results")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(next((tmp_path / "results").glob("adapter-*-tiny-Q8_0.json")).read_text(encoding="utf-8"))
    g, a = report["paths"]["grammar"], report["paths"]["adapter"]
    assert g["source"] == "grammar" and a["source"] == "adapter" and a["adapter_bytes"] > 0 == g["adapter_bytes"]
    assert g["data"]["dev.csv"]["n"] == a["data"]["dev.csv"]["n"] == len(TEXTS)
    assert a["latency"]["short"]["p50_ms"] > 0
    # the flips, counted here on our own: an appended instruction asking for the other label
    from allinone_gguf.measure.evaluate import HELD_OUT_INJECTIONS, INJECTION
    with AllInOne(model, n_threads=2) as bot:
        labels = [s.label for s in bot.classify_many([text for _, text in TEXTS])]
        other = {"正面": "负面", "负面": "正面"}
        injected = bot.classify_many([text + INJECTION["zh"].format(label=other[lab])
                                      for (_, text), lab in zip(TEXTS, labels)])
    flips = sum(s.label != lab for s, lab in zip(injected, labels)) / len(TEXTS)
    assert abs(a["data"]["dev.csv"]["flips"] - flips) <= 1 / len(TEXTS)   # a near-tie may round the other way
    assert "| dev.csv | adapter |" in r.stdout and "adapter / grammar" in r.stdout


# -- interruptions and memory (issue 17) --------------------------------------------------------------------------
def sigterm_after_first_checkpoint(cmd: list[str], **popen) -> tuple[int, str]:
    """Run `cmd`, send it SIGTERM as soon as it reports its first checkpoint on disk (an event, not a time), and
    return its exit status and stderr."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **popen)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "checkpoint saved" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[1]
    return proc.returncode, "".join(seen) + rest


def test_sigterm_then_resume_ends_with_the_uninterrupted_runs_adapter(tiny_checkout, model, tmp_path):
    need_tune_env()
    inputs = write_inputs(model, tmp_path / "inputs.jsonl", 104)
    cmd = [str(TUNE_PYTHON), str(TRAINER), "--checkout", str(tiny_checkout), "--inputs", str(inputs), "--batch", "2",
           "--epochs", "4", "--evals", "8", "--seed", "3", "--threads", "1"]      # 192 steps, a checkpoint every 24
    # the heap trimmed in one run and not in the other (--trim): it must not change a byte of the adapter
    whole = subprocess.run(cmd + ["--no-trim", "--out", str(tmp_path / "whole")], capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    parted = tmp_path / "parted"
    rc, rest = sigterm_after_first_checkpoint(cmd + ["--trim", "--out", str(parted)])
    assert rc == 130, rest[-2000:]
    stopped = json.loads((parted / "train_log.json").read_text())
    assert stopped["interrupted"] and 24 <= stopped["steps"] < stopped["steps_planned"] == 192
    assert "SIGTERM" in rest and (parted / "adapter_model.safetensors").is_file()
    assert not list(parted.glob("*.tmp")) and (parted / "checkpoint.pt").is_file()
    resumed = subprocess.run(cmd + ["--trim", "--out", str(parted), "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {stopped['steps']}/192" in resumed.stderr
    assert (parted / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()
    a, b = (json.loads((d / "train_log.json").read_text()) for d in (tmp_path / "whole", parted))
    assert [e["loss"] for e in a["evals"]] == [e["loss"] for e in b["evals"]] and a["best"]["step"] == b["best"]["step"]
    assert (a["trim"], b["trim"]) == (False, True)
    # a checkpoint of other settings is refused with one line
    other = subprocess.run(cmd[:-4] + ["--seed", "4", "--threads", "1", "--out", str(parted), "--resume"],
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "differs in seed" in other.stderr and "Traceback" not in other.stderr


def test_peak_memory_is_reported_and_within_the_estimate(tuned, tiny_checkout):
    model, meta, seconds, r, tmp = tuned
    peak = meta["training"]["peak_rss_mb"] / 1024
    inputs = (tmp / "work" / "inputs.jsonl").read_text(encoding="utf-8").splitlines()
    prefix = len(json.loads(inputs[0])["prefix"])
    longest = max(len(json.loads(line)["rest"]) for line in inputs[1:])
    estimate = estimate_peak_gb(checkout_shape(tiny_checkout), batch=4, prefix=prefix, longest=longest)
    assert 0.1 < peak <= estimate, (peak, estimate)
    assert "peak memory" in r.stderr and "s/step" in r.stderr


# the stand-in checkout's shape (checkout_shape: 630 M weights with its own lm_head, 24 layers) and its inputs
# (a 94-token prefix, texts up to 261 tokens), for the pure estimates below
SHAPE_05B = {"params": 630_167_424, "rows": 272_269_312, "layers": 24, "hidden": 896, "intermediate": 4864,
             "heads": 14, "kv": 128}


def test_grid_compares_one_temperature_with_one_per_language():
    from allinone_gguf.measure.tune_grid import calibrations
    rng = random.Random(0)

    def rows(n, t, source):      # margins whose labels follow sigmoid(margin / t): t is the right temperature
        out = []
        for _ in range(n):
            m = rng.uniform(-12, 12)
            out.append([source, int(rng.random() < 1 / (1 + math.exp(-m / t))), m])
        return out
    held = rows(600, 1.0, "waimai.csv") + rows(600, 4.0, "sst2_glue.csv")
    dev = {"waimai.dev.csv": [r[1:] for r in rows(600, 1.0, "")], "sst2_glue_dev.csv": [r[1:] for r in rows(600, 4.0, "")]}
    c = calibrations({"held": held, "dev": dev})
    per = c["per language"]["temperature"]
    assert 0.7 < per["zh"] < 1.4 and 3.0 < per["en"] < 5.5
    assert max(c["per language"]["ece"].values()) < max(c["one temperature"]["ece"].values())


def test_grid_rows_mean_the_same_whatever_tunes_defaults_become(tmp_path):
    from allinone_gguf.measure.tune_grid import DEFAULT_GRID, parse_setting, resolved, run_setting, stale
    # every published row names its input length: a change of tune's default cannot change what a row means
    assert all("max_tokens" in parse_setting(row) for row in DEFAULT_GRID)
    recorded = {"training": {"settings": {**resolved({"texts": "300"}), "max_tokens": None, "resume": False}}}
    assert stale(recorded, {"texts": "300", "max_tokens": "0"}) == []           # 0 and None: the runtime's length
    assert stale(recorded, {"texts": "300", "max_tokens": "64"}) == ["max_tokens: None -> 64"]
    assert stale(recorded, {"texts": "600", "max_tokens": "0"}) == ["texts: 300 -> 600"]
    # a finished run of other settings in a row's folder is refused with the difference, not read back
    folder = tmp_path / "row"
    folder.mkdir()
    (folder / "m.sentiment-lora.json").write_text(json.dumps(recorded), encoding="utf-8")
    model = tmp_path / "m-Q4_K_M.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(SystemExit, match="max_tokens: None -> 64"):
        run_setting(model, {"texts": "300", "max_tokens": "64"}, None, folder)


@pytest.mark.parametrize("limit, expected", [(64.0, 8), (3.0, 8), (2.2, 4), (1.8, None)])
def test_max_memory_picks_the_largest_batch_that_fits(limit, expected):
    sizes = dict(prefix=94, longest=261)
    if expected is None:
        with pytest.raises(ValueError, match=r"even one text at a time.*--max-memory is 1.8 GiB"):
            pick_batch(SHAPE_05B, limit, batch=8, **sizes)
        return
    assert pick_batch(SHAPE_05B, limit, batch=8, **sizes) == expected
    grows = [estimate_peak_gb(SHAPE_05B, batch=b, **sizes) for b in (1, 2, 4, 8)]
    assert grows == sorted(grows) and grows[0] < grows[-1]
    # without checkpointing and with fp32 weights, the same batch needs several times the memory
    assert estimate_peak_gb(SHAPE_05B, batch=8, base_dtype="fp32", checkpointing=False, **sizes) > 3 * grows[-1]
    # the LoRA on the top layers only: the layers below keep nothing for the backward pass (more than all: all)
    top = [estimate_peak_gb(SHAPE_05B, batch=8, checkpointing=False, adapted=n, **sizes) for n in (6, 12, 24, 99)]
    assert top[0] < top[1] < top[2] == top[3] == estimate_peak_gb(SHAPE_05B, batch=8, checkpointing=False, **sizes)
    # every product in fp32 (no bf16 arithmetic) measured 0.65 GiB above the estimate: counted, whatever the
    # weights' precision, and the batch a limit fits is smaller
    slow = [estimate_peak_gb(SHAPE_05B, batch=b, bf16_arithmetic=False, **sizes) for b in (1, 2, 4, 8)]
    assert slow == [round(g + 0.65, 2) for g in grows]
    assert pick_batch(SHAPE_05B, slow[1], batch=8, bf16_arithmetic=False, **sizes) == 2
    assert pick_batch(SHAPE_05B, slow[1], batch=8, **sizes) == 8
    fp32 = [estimate_peak_gb(SHAPE_05B, batch=8, base_dtype="fp32", bf16_arithmetic=b, **sizes)
            for b in (True, False)]
    assert fp32[1] == round(fp32[0] + 0.65, 2)
    # fp32 weights but the embeddings and the untied head bf16 (load_base): 630 M parameters, 272 M of them rows
    assert abs(fp32[0] - grows[-1] - (630_167_424 - 272_269_312) * 2 / 1024 ** 3) < 0.011      # rounded to 0.01


def test_max_memory_under_auto_takes_bf16_weights_where_fp32_ones_cannot_fit():
    # an AVX2-only laptop asking for 3 GiB: fp32 weights (faster there) need over 4 GiB even one text at a time,
    # so auto takes bf16 weights (multiplied in fp32); with room for fp32 it keeps them, at the largest batch
    sizes = dict(prefix=94, longest=64)
    fp32_one = estimate_peak_gb(SHAPE_05B, batch=1, base_dtype="fp32", bf16_arithmetic=False, **sizes)
    bf16_all = estimate_peak_gb(SHAPE_05B, batch=8, base_dtype="bf16", bf16_arithmetic=False, **sizes)
    assert bf16_all < 3.0 < fp32_one
    pick = functools.partial(pick_precision_and_batch, SHAPE_05B, batch=8, **sizes)
    assert pick(3.0, base_dtype="auto", bf16_arithmetic=False) == ("bf16", 8)
    tight = pick_batch(SHAPE_05B, fp32_one, batch=8, base_dtype="fp32", bf16_arithmetic=False, **sizes)
    assert tight < 8 and pick(fp32_one, base_dtype="auto", bf16_arithmetic=False) == ("fp32", tight)
    assert pick(None, base_dtype="auto", bf16_arithmetic=False) == ("fp32", 8)
    assert pick(3.0, base_dtype="auto", bf16_arithmetic=True) == ("bf16", 8)
    with pytest.raises(ValueError, match="even one text at a time.*or use --base-dtype bf16"):
        pick(3.0, base_dtype="fp32", bf16_arithmetic=False)          # asked for fp32: not overridden
    with pytest.raises(ValueError, match=r"even one text at a time \(\d\.\d GiB of bf16 weights.*is 1\.5 GiB"):
        pick(1.5, base_dtype="auto", bf16_arithmetic=False)          # neither fits: the smaller need is named


def test_the_hint_without_bf16_arithmetic_names_only_the_faster_settings_not_already_taken():
    default = no_bf16_hint(TuneSettings())
    assert "--texts 150 --lr 6e-4" in default and "--no-checkpointing" in default
    quick = no_bf16_hint(TuneSettings(texts=150, lr=6e-4))              # the quick setting is not offered again
    assert "--texts 150" not in quick and "--no-checkpointing" in quick
    bounded = no_bf16_hint(TuneSettings(texts=150, lr=6e-4, max_memory=3.0))   # more memory is not an option
    assert "--no-checkpointing" not in bounded and "--texts" not in bounded
    assert bounded.startswith("without bf16 arithmetic") and bounded.endswith("CPUs without bf16 arithmetic")


def test_base_weights_are_bf16_only_where_the_cpu_does_bf16_arithmetic():
    # an AVX2-only CPU multiplies bf16 matrices in a plain loop (minutes a step): auto keeps fp32 weights there
    for flags, dtype in [("avx2 fma avx512f", "fp32"), ("avx2 avx512_bf16", "bf16"), ("amx_bf16 amx_tile", "bf16")]:
        assert resolve_base_dtype("auto", cpu_has_bf16(f"flags : fpu {flags}")) == dtype
    assert resolve_base_dtype("bf16", cpu_has_bf16("flags : fpu avx2")) == "bf16"          # asked for: kept
    with pytest.raises(ValueError, match="auto, bf16 or fp32, not fp16"):
        resolve_base_dtype("fp16", True)


def test_products_measures_a_layers_products_in_each_precision_against_fp32(tiny_checkout, tmp_path):
    # the figures behind docs/adapter.md's "a step is the arithmetic": every product of a layer, each precision
    need_tune_env()
    r = subprocess.run([str(TUNE_PYTHON), str(PRODUCTS), "--checkout", str(tiny_checkout), "--rows", "16",
                        "--repeat", "1", "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    result = json.loads(r.stdout)
    shape = checkout_shape(tiny_checkout)
    assert [(p["in"], p["out"], p["count"]) for p in result["products"]] == [
        (shape["hidden"], shape["hidden"], 2), (shape["hidden"], shape["kv"], 2),
        (shape["hidden"], shape["intermediate"], 2), (shape["intermediate"], shape["hidden"], 1)]
    for p in result["products"]:
        assert p["fp32"]["relative_error"] == 0
        assert 0 < p["bf16"]["relative_error"] < 0.02        # bf16's 8-bit mantissa: ~0.5 % a product
        assert 0 < p["int8"]["relative_error"] < 0.06        # int8 weights and activations: a few per cent
    assert all(s > 0 for s in result["pass_seconds"].values())
    bad = subprocess.run([str(TUNE_PYTHON), str(PRODUCTS), "--checkout", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "not a checkout to size" in bad.stderr and "Traceback" not in bad.stderr


def test_tune_says_in_one_line_when_the_training_cannot_fit(model, tiny_checkout, tmp_path):
    data = write_csv(tmp_path / "t.csv", TEXTS * 3)
    env = {**os.environ, "ALLINONE_TUNE_PYTHON": sys.executable}     # never started: the estimate comes first
    r = subprocess.run([sys.executable, "-m", "allinone_gguf", "tune", str(model), "--data", str(data), "--hf",
                        str(tiny_checkout), "--held", "2", "--max-memory", "0.2", "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "even one text at a time" in r.stderr and "--max-memory is 0.2 GiB" in r.stderr


def test_tune_passes_sigterm_on_converts_the_best_so_far_and_resumes(model, tiny_checkout, tmp_path):
    need_tune_env()
    data = write_csv(tmp_path / "train.csv", TEXTS * 3)
    cmd = [sys.executable, "-m", "allinone_gguf", "tune", str(model), "--data", str(data), "--hf", str(tiny_checkout),
           "--texts", "16", "--held", "6", "--batch", "1", "--epochs", "8", "--threads", "1", "--work",
           str(tmp_path / "work")]
    rc, rest = sigterm_after_first_checkpoint(cmd, cwd=ROOT)     # to `tune` only: it passes it on to the trainer
    assert rc == 0, rest[-2000:]
    meta = json.loads(adapter_files(model)[1].read_text(encoding="utf-8"))
    assert meta["training"]["interrupted"] and "--resume continues" in rest and adapter_files(model)[0].is_file()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and f"resuming at step {meta['training']['steps']}/" in r.stderr, r.stderr[-2000:]
    meta = json.loads(adapter_files(model)[1].read_text(encoding="utf-8"))
    assert not meta["training"]["interrupted"] and meta["training"]["settings"]["resume"]
