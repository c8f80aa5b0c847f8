"""The app as a network server: bounds, fairness and structured outputs, through HTTP against the real app.

    python -m allinone_gguf.measure.bench_api MODEL.gguf [--threads 2] [--texts 2000] [--chats 10]
    make bench-api [MODEL=...]

One run of `python app.py --api-key ...` on MODEL, then:
1. bounds: the time to a 413 for a 20 MB chat body and to a 400 for a 10,000-text classify, and that a normal
   request is answered right after;
2. fairness: a chat stream's time to first token (p50/p95 of --chats streams, one after the other) alone, then
   while a --texts-text /v1/classify runs, and the classification's texts/s alone and under those chats;
3. structured outputs: 20 replies with a strict json_schema response_format, how many parse and validate.
Results: a Markdown table on stdout, and JSON and Markdown in bench/results/api-<date>-<model>.json (.md), with
machine and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import threading
import time
from pathlib import Path

from ..paths import ROOT
from .app_process import running_app
from .bench_serving import PROMPTS
from .bench_worker import percentile
from .machine import cpu_info, write_result

KEY = "bench"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["sentiment", "reason", "urgent"],
          "properties": {"sentiment": {"enum": ["positive", "negative"]}, "reason": {"type": "string"},
                         "urgent": {"type": "boolean"}}}
TEXTS = ["这家店的菜很好吃，服务也很周到。", "等了两个小时外卖还没到，太失望了。", "质量一般，价格还可以。",
         "物流很快，包装完好，五星好评！", "客服态度恶劣，再也不买了。", "房间干净，位置方便，下次还住。"]


def first_token_s(client, text: str, seed: int) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": text}], stream=True,
                                            max_tokens=16, seed=seed)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first if first is not None else float("nan")


def valid(reply: str) -> bool:
    try:
        value = json.loads(reply)
    except ValueError:
        return False
    return (isinstance(value, dict) and set(value) == set(SCHEMA["required"])
            and value["sentiment"] in ("positive", "negative") and isinstance(value["reason"], str)
            and isinstance(value["urgent"], bool))


def run(model: Path, threads: int, n_texts: int, n_chats: int) -> dict:
    import httpx
    import openai
    auth = {"Authorization": f"Bearer {KEY}"}
    out: dict = {"model": model.name, "threads": threads, "machine": cpu_info()["cpu"],
                 "date": datetime.date.today().isoformat()}
    # --sentiment-cache 0: the classification's warm-up texts come round again in the timed one, decoded each time
    with running_app(model, model.parent, "--n-threads", str(threads), "--api-key", KEY,
                     "--sentiment-cache", "0") as server:
        client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=600)
        first_token_s(client, "你好", 0)                                            # warm-up, left out
        # 1. bounds
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "长" * (7 << 20)}]}).encode()
        start = time.perf_counter()
        r = httpx.post(server.url + "v1/chat/completions", content=body, timeout=60,
                       headers={**auth, "Content-Type": "application/json"})
        out["body_20mb"] = {"status": r.status_code, "seconds": round(time.perf_counter() - start, 3),
                            "bytes": len(body)}
        start = time.perf_counter()
        r = httpx.post(server.url + "v1/classify", json={"input": ["好"] * 10_000}, headers=auth, timeout=60)
        out["classify_10000"] = {"status": r.status_code, "seconds": round(time.perf_counter() - start, 3)}
        start = time.perf_counter()
        r = httpx.post(server.url + "v1/classify", json={"input": "然后呢"}, headers=auth, timeout=60)
        out["normal_after"] = {"status": r.status_code, "seconds": round(time.perf_counter() - start, 3)}
        # 2. fairness
        alone = [first_token_s(client, PROMPTS[i % len(PROMPTS)], i) for i in range(n_chats)]
        texts = [f"{TEXTS[i % len(TEXTS)]}（第{i}条）" for i in range(n_texts)]
        start = time.perf_counter()
        httpx.post(server.url + "v1/classify", json={"input": texts[:200]}, headers=auth, timeout=600)
        alone_rate = 200 / (time.perf_counter() - start)
        done = threading.Event()
        result: dict = {}

        def classify_all():
            t0 = time.perf_counter()
            r = httpx.post(server.url + "v1/classify", json={"input": texts}, headers=auth, timeout=3600)
            result.update(status=r.status_code, seconds=time.perf_counter() - t0)
            done.set()
        worker = threading.Thread(target=classify_all)
        worker.start()
        time.sleep(1.0)                      # the classification is under way (it takes minutes)
        busy = []
        for i in range(n_chats):
            if done.is_set():
                break
            busy.append(first_token_s(client, PROMPTS[i % len(PROMPTS)], 100 + i))
        overlapped = not done.is_set()          # every timed chat ran while the classification did
        worker.join()
        out["fairness"] = {
            "chats": n_chats, "texts": n_texts,
            "ttft_alone_p50_s": round(percentile(alone, 50), 3), "ttft_alone_p95_s": round(percentile(alone, 95), 3),
            "ttft_during_classify_p50_s": round(percentile(busy, 50), 3) if busy else None,
            "ttft_during_classify_p95_s": round(percentile(busy, 95), 3) if busy else None,
            "chats_measured_during_classify": len(busy), "all_chats_overlapped_the_classify": overlapped,
            "classify_status": result.get("status"), "classify_seconds": round(result.get("seconds", 0), 1),
            "classify_texts_per_s_alone": round(alone_rate, 2),
            "classify_texts_per_s_with_chats": round(n_texts / result["seconds"], 2) if result.get("seconds") else None,
        }
        # 3. structured outputs
        ok = 0
        for i in range(20):
            r = client.chat.completions.create(
                model="x", seed=i, max_tokens=160, messages=[{"role": "user", "content": TEXTS[i % len(TEXTS)]}],
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "triage", "schema": SCHEMA, "strict": True}})
            ok += valid(r.choices[0].message.content)
        out["json_schema"] = {"replies": 20, "valid": ok}
    return out


def markdown(r: dict) -> str:
    f = r["fairness"]
    return "\n".join([
        f"API bench — {r['model']}, {r['threads']} threads, {r['machine']}, {r['date']}",
        "",
        "| figure | value |", "|---|---|",
        f"| 20 MB chat body | HTTP {r['body_20mb']['status']} in {r['body_20mb']['seconds']} s |",
        f"| 10,000-text classify | HTTP {r['classify_10000']['status']} in {r['classify_10000']['seconds']} s |",
        f"| normal classify right after | HTTP {r['normal_after']['status']} in {r['normal_after']['seconds']} s |",
        f"| chat first token, alone: p50 / p95 | {f['ttft_alone_p50_s']} / {f['ttft_alone_p95_s']} s |",
        f"| chat first token during a {f['texts']}-text classify: p50 / p95 "
        f"({f['chats_measured_during_classify']} chats) | {f['ttft_during_classify_p50_s']} / "
        f"{f['ttft_during_classify_p95_s']} s |",
        f"| classify texts/s alone / with the chats | {f['classify_texts_per_s_alone']} / "
        f"{f['classify_texts_per_s_with_chats']} |",
        f"| json_schema replies that parse and validate | {r['json_schema']['valid']} of {r['json_schema']['replies']} |",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=2000, help="texts in the large classification (default 2000)")
    p.add_argument("--chats", type=int, default=10, help="chat streams timed alone and during it (default 10)")
    args = p.parse_args(argv)
    result = run(args.model, args.threads, args.texts, args.chats)
    text = markdown(result)
    print(text)
    path = write_result("api", args.model, result, text)
    print(f"\nwritten: {path.relative_to(ROOT)} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
