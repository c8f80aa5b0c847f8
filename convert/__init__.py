"""Hugging Face checkout -> GGUF (F16, Q8_0, Q4_K_M) for Qwen models (Qwen1.5 to Qwen3), without torch.

    python -m convert all Qwen/Qwen1.5-0.5B-Chat --out models

Stages, one module each: `download` (huggingface-hub), `hf_to_gguf` (our streaming converter),
`quantize` (llama.cpp's quantizer), `pipeline` (the three in a row, with a manifest); and back, `gguf_to_hf`
(a GGUF -> a checkout, dequantized, for tuning when there is no original checkout).
"""
