"""Training: a sentiment LoRA for the analyst role only (`python -m allinone_gguf tune`, `make tune`).

config.py (the knobs), data.py (texts, held-back share, injected copies), run.py (the steps; torch-free),
train_lora.py (PEFT on torch, run only inside .venv-tune). The runtime finds the result beside the model
(runtime/adapter.py).
"""
