"""Build tiny random PEFT LoRA adapters for the tiny checkouts of tinymodel.py, without peft or torch.

    python tests/tinylora.py CHECKOUT OUT_DIR       # OUT_DIR/adapter_config.json + adapter_model.safetensors

What PEFT's `save_pretrained` writes for a causal LM: adapter_model.safetensors with PEFT's tensor names
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (r, in) and `...lora_B.weight` (out, r);
`base_model.model.model.embed_tokens.lora_embedding_A` (r, vocab) and `..._B` (hidden, r) for the embedding),
stored in name order as safetensors' writer does, and adapter_config.json with PEFT's keys. Unlike a freshly
initialised PEFT adapter, lora_B is not zero, so the adapter changes the model's output as a trained one does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tinymodel import weight_shapes, write_safetensors  # noqa: E402

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
# adapter_config.json of PEFT 0.17 for a plain LoRA on a causal LM; build_adapter fills r, alpha and targets.
PEFT_CONFIG = {
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "corda_config": None, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
    "inference_mode": True, "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False, "lora_dropout": 0.05,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None, "target_modules": [],
    "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False,
}
# PEFT's model card stub (README.md); llama.cpp's converter reads general.* keys from it.
MODEL_CARD = "---\nbase_model: {base}\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n"


def module_names(config: dict, targets: tuple[str, ...], layers: list[int] | None) -> list[str]:
    """Full module names (model.layers.N.self_attn.q_proj, model.embed_tokens, lm_head) that `targets` select."""
    names = []
    for i in (range(config["num_hidden_layers"]) if layers is None else layers):
        names += [f"model.layers.{i}.self_attn.{t}" for t in targets if t in ATTENTION]
        names += [f"model.layers.{i}.mlp.{t}" for t in targets if t in MLP]
    names += [m for t, m in (("embed_tokens", "model.embed_tokens"), ("lm_head", "lm_head")) if t in targets]
    return names


def lora_tensors(config: dict, modules: list[str], r: int, rank_pattern: dict[str, int],
                 seed: int) -> dict[str, np.ndarray]:
    """PEFT name -> float32 array for each module: A, B ~ N(0, 0.05)."""
    rng = np.random.default_rng(seed)
    shapes = weight_shapes(config, tied=False)
    out = {}
    for m in modules:
        rows, cols = shapes[m + ".weight"]          # (out, in); the embedding is (vocab, hidden)
        rank = rank_pattern.get(m, r)
        if m == "model.embed_tokens":
            out[PEFT_PREFIX + m + ".lora_embedding_A"] = rng.normal(0, 0.05, (rank, rows))
            out[PEFT_PREFIX + m + ".lora_embedding_B"] = rng.normal(0, 0.05, (cols, rank))
        else:
            out[PEFT_PREFIX + m + ".lora_A.weight"] = rng.normal(0, 0.05, (rank, cols))
            out[PEFT_PREFIX + m + ".lora_B.weight"] = rng.normal(0, 0.05, (rows, rank))
    return {k: v.astype(np.float32) for k, v in out.items()}


def build_adapter(checkout: Path, out: Path, *, targets: tuple[str, ...] = ATTENTION + ("gate_proj",), r: int = 8,
                  alpha: float = 16, dtype: str = "F32", layers: list[int] | None = None,
                  rank_pattern: dict[str, int] | None = None, seed: int = 0, file_order: str = "name",
                  model_card: bool = False, extra: dict | None = None) -> Path:
    """An adapter folder for the checkout's config.json. `layers` restricts the layers (PEFT's
    layers_to_transform); `rank_pattern` maps full module names to their own rank; `file_order="reversed"`
    stores the tensors in reverse name order; `extra` overrides adapter_config.json keys."""
    config = json.loads((Path(checkout) / "config.json").read_text(encoding="utf-8"))
    rank_pattern = rank_pattern or {}
    tensors = lora_tensors(config, module_names(config, targets, layers), r, rank_pattern, seed)
    names = sorted(tensors, reverse=file_order == "reversed")
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", {n: tensors[n] for n in names}, dtype)
    adapter_config = PEFT_CONFIG | {
        "base_model_name_or_path": str(checkout), "r": r, "lora_alpha": alpha, "target_modules": sorted(targets),
        "layers_to_transform": layers, "rank_pattern": rank_pattern} | (extra or {})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    if model_card:
        (out / "README.md").write_text(MODEL_CARD.format(base=f"Qwen/{Path(checkout).name}"), encoding="utf-8")
    return out


def read_adapter(folder: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 (for checks), through the converter's own reader."""
    from convert.safetensors_np import SafetensorsFile
    return {t.name: np.concatenate(list(t.rows())).reshape(t.shape)
            for t in SafetensorsFile(folder / "adapter_model.safetensors").tensors}


if __name__ == "__main__":
    print(build_adapter(Path(sys.argv[1]), Path(sys.argv[2])))
