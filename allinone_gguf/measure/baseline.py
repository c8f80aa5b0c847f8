"""The seeds' approach, measured like our GGUF files: Hugging Face transformers in FP32 on the same checkpoint.

`make bench-baseline` runs it through `python -m allinone_gguf bench --baseline HF_CHECKOUT`, with a Python
that has torch and transformers (`make reference-env`); the product itself never imports them. It reads the
same job file as allinone_gguf/measure/bench_worker.py and writes a result with the same fields:

    .venv-ref/bin/python allinone_gguf/measure/baseline.py JOB.json RESULT.json      # JOB names "hf": a checkout or hub id

What "the seeds' approach" means here, as the seed articles describe it:
- sentiment: the cold-analyst prompt + "用户输入:" + text, no chat template, `generate(max_new_tokens=5)` with
  the checkpoint's own generation config, then substring parsing: "正面" / "负面" in the output, else "中性".
  Only the new tokens are parsed (the seed decodes the prompt too, which contains both labels, so its
  literal code would always answer 正面).
- reply: the chat template with the warm-assistant system prompt and no history, sampling with temperature
  0.7 and top_p 0.9, at most the job's reply_tokens new tokens (the seeds use 128).
The seeds' prompts and the timing helpers are the project's own, not copies: this Python has neither
llama.cpp nor this package installed, so the repository is put on sys.path and only pure-Python modules are
imported from it (measure/bench_worker.py's helpers; runtime/prompts.py by its file, because importing the
runtime package would load llama.cpp). Exit status 3 when torch or transformers is missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from allinone_gguf.measure.bench_worker import latency_summary, memory_mb, percentile  # noqa: E402


def _load_prompts():
    """allinone_gguf/runtime/prompts.py (standard library only), without the runtime package around it."""
    spec = importlib.util.spec_from_file_location("allinone_gguf_prompts", ROOT / "allinone_gguf/runtime/prompts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses looks its module up while the file runs
    spec.loader.exec_module(module)
    return module


_prompts = _load_prompts()
MISSING = 3
SENTIMENT_SYSTEM = _prompts.SENTIMENT_PROMPTS["seed"].system["zh"]   # the seeds' cold analyst
CHAT_SYSTEM = _prompts.CHAT_SYSTEM["zh"]                             # the seeds' warm assistant


class Seeds:
    """The seeds' QwenAllInOne, timed."""

    def __init__(self, source: str, n_threads: int | None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if n_threads:
            torch.set_num_threads(n_threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(source)
        # the seeds pass torch_dtype=torch.float32; newer transformers call it dtype
        import transformers
        dtype_arg = "dtype" if tuple(map(int, transformers.__version__.split(".")[:2])) >= (4, 56) else "torch_dtype"
        self.model = AutoModelForCausalLM.from_pretrained(source, low_cpu_mem_usage=True, **{dtype_arg: torch.float32})
        self.model.eval()

    def classify(self, text: str) -> str:
        prompt = f"{SENTIMENT_SYSTEM}\n\n用户输入:{text}"
        inputs = self.tok(prompt, return_tensors="pt")
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=5, num_return_sequences=1,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.eos_token_id)
        answer = self.tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return "正面" if "正面" in answer else "负面" if "负面" in answer else "中性"

    def reply(self, text: str, max_new_tokens: int) -> dict:
        """One reply, with the time of every new token (a streamer's put() per token)."""
        from transformers.generation.streamers import BaseStreamer
        stamps: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": text}]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tok(prompt, return_tensors="pt")
        start = time.perf_counter()
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7,
                                      top_p=0.9, eos_token_id=self.tok.eos_token_id,
                                      pad_token_id=self.tok.eos_token_id, streamer=Clock())
        end = time.perf_counter()
        new = stamps[1:]                      # the first put() is the prompt itself
        n_prompt = inputs["input_ids"].shape[1]
        first = new[0] if new else end
        return {"ttft_s": first - start, "reply_s": end - start, "prompt_tokens": n_prompt, "prompt_s": first - start,
                "gen_tokens": max(len(new) - 1, 0), "gen_s": (new[-1] - new[0]) if len(new) > 1 else 0.0,
                "pieces": out.shape[1] - n_prompt}


def run_job(job: dict) -> dict:
    import importlib.metadata
    before = memory_mb()
    start = time.perf_counter()
    bot = Seeds(job["hf"], job.get("n_threads"))
    import torch
    torch.manual_seed(job["seed"])
    result = {"engine": f"transformers {importlib.metadata.version('transformers')} FP32 "
                        f"(torch {torch.__version__}), the seeds' prompts and substring parsing",
              "load": {"seconds": time.perf_counter() - start, "rss_before_mb": before["rss_mb"],
                       **{k + "_after_load": v for k, v in memory_mb().items()}}}
    texts, runs, turns = job["texts"], job["runs"], job["turns"]
    bot.classify(texts["short"][-1])          # warm-up, left out
    bot.reply(texts["short"][0], 4)
    alone, interleaved, all_turns = {}, {}, []
    for kind, items in texts.items():
        print(f"  [baseline] sentiment alone: {kind}", file=sys.stderr, flush=True)
        times = []
        for text in items[:runs]:
            t0 = time.perf_counter()
            bot.classify(text)
            times.append(time.perf_counter() - t0)
        alone[kind] = latency_summary(times, items[:runs])
    for kind, items in texts.items():
        print(f"  [baseline] interleaved with chat turns: {kind}", file=sys.stderr, flush=True)
        kind_turns = []
        for text in items[:turns]:
            t0 = time.perf_counter()
            bot.classify(text)
            t1 = time.perf_counter()
            r = bot.reply(text, job["reply_tokens"])
            kind_turns.append({**r, "classify_s": t1 - t0, "turn_s": time.perf_counter() - t0})
        interleaved[kind] = latency_summary([t["classify_s"] for t in kind_turns], items[:turns])
        all_turns += kind_turns
    gen_s, p_s = sum(t["gen_s"] for t in all_turns), sum(t["prompt_s"] for t in all_turns)
    result["sentiment"] = {"alone": alone, "interleaved": interleaved}
    result["reply"] = {
        "max_tokens": job["reply_tokens"], "turns": len(all_turns), "token_counts": "transformers generate",
        "ttft_ms_p50": percentile([t["ttft_s"] * 1000 for t in all_turns], 50),
        "turn_s_p50": percentile([t["turn_s"] for t in all_turns], 50),
        "turn_s_mean": statistics.fmean(t["turn_s"] for t in all_turns),
        "tokens_per_reply": statistics.fmean(t["pieces"] for t in all_turns),
        "gen_tokens_per_s": sum(t["gen_tokens"] for t in all_turns) / gen_s if gen_s else None,
        "prompt_tokens_per_s": sum(t["prompt_tokens"] for t in all_turns) / p_s if p_s else None}
    result["load"].update({k + "_after_chat": v for k, v in memory_mb().items()})
    result["accuracy"] = {}
    for name, rows in job["datasets"].items():   # [(gold, text), ...], read by measure/bench.py
        print(f"  [baseline] accuracy: {name}", file=sys.stderr, flush=True)
        rows = rows[: job["limit"] or None]
        t0 = time.perf_counter()
        predicted = [bot.classify(text) for _, text in rows]
        result["accuracy"][name] = {"gold": [gold for gold, _ in rows],
                                    "predicted": predicted, "seconds": time.perf_counter() - t0}
    return result


def main(job_path: str, result_path: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must already be in the local cache
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"measure/baseline.py: {exc.name} is not installed here ({sys.executable}); "
              "`make reference-env` builds an environment with torch and transformers", file=sys.stderr)
        return MISSING
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    result = run_job(job)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
