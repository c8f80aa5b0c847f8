"""Each message's whole job — its label, then the reply — through the HTTP API, beside llama-server's bare reply.

    python -m allinone_gguf.measure.bench_messages MODEL.gguf [--llama-server PATH] [--users 1 4 8]
    make bench-messages [MODEL=...]

For 1, 4 and 8 concurrent users (each sends --rounds messages one after the other, streamed through the
official `openai` client, --tokens new tokens, both servers sampling with the runtime's defaults: temperature,
top_k, top_p, repetition penalty) against our app (`app.py --parallel 4`): the
time to the label (the first chunk, which carries "sentiment"), the time to the first reply token (p50/p95),
per-stream and aggregate tokens/s, the app's RSS after start and after all the turns (and after start without the
page, `--no-page`), and one user's messages through the runtime alone (`AllInOne.respond` in this process: what the
HTTP layer adds). The same clients then
ask llama.cpp's own `llama-server` on the same file, threads and slots (`-np 4 -c 4096`), which only replies,
when its binary is given or was built by `make llama-server`; without it that column is skipped, and the run
says so. Results: a Markdown table on stdout, JSON and Markdown in bench/results/messages-<date>-<model>.json (.md).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

from ..paths import ROOT
from ..runtime.config import Settings
from .app_process import free_port, running_app
from .bench_serving import PROMPTS
from .bench_worker import REPLY_TOKENS, percentile
from .machine import cpu_info, git_commit, rss_mb, write_result

LLAMA_SERVER = Path.home() / ".cache" / "allinone-gguf" / "llama.cpp-0.3.36" / "bin" / "llama-server"
SLOTS, CTX = 4, 4096


def one_message(client, text: str, tokens: int, seed: int) -> dict:
    # Both servers sample alike: our runtime's defaults, sent to llama-server too (its own are top_k 40, top_p 0.95,
    # min_p 0.05, no repetition penalty); our API reads top_p and ignores the keys it does not know.
    s = Settings()
    start = time.perf_counter()
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": text}], stream=True,
                                            max_tokens=tokens, temperature=s.temperature, seed=seed, top_p=s.top_p,
                                            extra_body={"top_k": s.top_k, "repeat_penalty": s.repeat_penalty,
                                                        "min_p": 0.0},
                                            stream_options={"include_usage": True})
    label = first = None
    n = 0
    for chunk in stream:
        now = time.perf_counter()
        if label is None and (chunk.model_extra or {}).get("sentiment"):
            label = now - start
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = now
        if chunk.usage:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"label_s": label, "ttft_s": (first or end) - start, "tokens": n, "start": start, "end": end,
            "tps": (n - 1) / (end - first) if first and n > 1 and end > first else float("nan")}


def run_users(base_url: str, users: int, rounds: int, tokens: int, key: str | None) -> dict:
    import openai
    client = openai.OpenAI(base_url=base_url, api_key=key or "none", max_retries=0, timeout=600)
    one_message(client, "你好", 4, 0)                                   # warm-up, left out
    results: list[dict] = []
    lock, barrier = threading.Lock(), threading.Barrier(users)

    def user(u: int) -> None:
        barrier.wait()
        for r in range(rounds):
            m = one_message(client, PROMPTS[(u + r * users) % len(PROMPTS)], tokens, 1000 * u + r)
            with lock:
                results.append(m)
    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(m["end"] for m in results) - min(m["start"] for m in results)
    labels = [m["label_s"] for m in results if m["label_s"] is not None]
    ttft = [m["ttft_s"] for m in results]
    return {"users": users, "messages": len(results), "tokens": sum(m["tokens"] for m in results),
            "aggregate_tps": sum(m["tokens"] for m in results) / wall, "messages_per_s": len(results) / wall,
            "per_stream_tps": statistics.fmean(m["tps"] for m in results if m["tps"] == m["tps"]),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "label_p50_s": percentile(labels, 50) if labels else None,
            "label_p95_s": percentile(labels, 95) if labels else None}


def runtime_alone(model: Path, threads: int, rounds: int, tokens: int) -> dict:
    """One user's messages (run_users' texts and seeds) through `AllInOne.respond` in this process: the label and
    first token without the HTTP layer, so the difference is what HTTP, the app and the client add."""
    from ..runtime import AllInOne
    labels, firsts = [], []
    with AllInOne(model, n_threads=threads, parallel=SLOTS, sentiment_cache=0) as bot:
        "".join(bot.respond("你好", max_tokens=4))                         # warm-up, left out
        for r in range(rounds):
            start = time.perf_counter()
            with bot.respond(PROMPTS[r % len(PROMPTS)], max_tokens=tokens, seed=r) as stream:   # runtime's sampling
                stream.sentiment()
                labels.append(time.perf_counter() - start)
                first = next((time.perf_counter() for piece in stream if piece), None)
                firsts.append((first or time.perf_counter()) - start)
                "".join(stream)
    return {"messages": rounds, "label_p50_s": percentile(labels, 50), "ttft_p50_s": percentile(firsts, 50)}


@contextlib.contextmanager
def llama_server(binary: Path, model: Path, threads: int):
    port = free_port()
    log = open(os.devnull, "w")
    proc = subprocess.Popen([str(binary), "-m", str(model), "-t", str(threads), "-np", str(SLOTS), "-c", str(CTX),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become ready in 300 s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def measure(model: Path, threads: int, users: list[int], rounds: int, tokens: int, server: Path | None) -> dict:
    """Both servers run side by side (idle while the other is measured); each user count is measured on ours
    and then on llama-server, so a change in the machine's load touches both columns alike."""
    out = {"model": model.name, "threads": threads, "slots": SLOTS, "tokens": tokens, "rounds": rounds,
           "machine": cpu_info(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
           "loadavg_start": list(os.getloadavg()), "ours": [], "llama_server": None,
           "sampling": "temperature {0.temperature}, top_k {0.top_k}, top_p {0.top_p}, repeat_penalty "
                       "{0.repeat_penalty}".format(Settings())}
    with contextlib.ExitStack() as stack:
        # --sentiment-cache 0: the users' messages repeat, and each message's label is part of what is measured
        app = stack.enter_context(running_app(model, model.parent, "--n-threads", str(threads),
                                              "--parallel", str(SLOTS), "--sentiment-cache", "0"))
        out["app_rss_start_mb"] = rss_mb(app.proc.pid)
        peer = None
        if server is not None and server.is_file():
            url, pid = stack.enter_context(llama_server(server, model, threads))
            peer = out["llama_server"] = {"binary": str(server), "runs": []}
        for n in users:
            print(f"  ours: {n} user(s) ...", flush=True)
            out["ours"].append(run_users(app.url + "v1", n, rounds, tokens, None))
            if peer is not None:
                print(f"  llama-server: {n} user(s) ...", flush=True)
                peer["runs"].append(run_users(url, n, rounds, tokens, None))
        out["app_rss_end_mb"] = rss_mb(app.proc.pid)
        out["turns"] = sum(r["messages"] for r in out["ours"]) + len(users)
        if peer is not None:
            peer["rss_mb"] = rss_mb(pid)
    with running_app(model, model.parent, "--n-threads", str(threads), "--parallel", str(SLOTS), "--no-page") as api:
        out["api_only_rss_start_mb"] = rss_mb(api.proc.pid)       # the same app without the Gradio page
    print("  the runtime alone: 1 user ...", flush=True)
    out["runtime_alone"] = runtime_alone(model, threads, rounds, tokens)
    out["loadavg_end"] = list(os.getloadavg())
    return out


def render(r: dict) -> str:
    peer = {x["users"]: x for x in (r["llama_server"] or {}).get("runs", [])}
    lines = [f"Messages through the HTTP API — {r['model']}, {r['threads']} threads, {r['slots']} slots, "
             f"{r['tokens']} new tokens ({r.get('sampling') or 'at temperature 0.7'}), {r['rounds']} messages per user; {r['machine']['cpu']}, {r['date']}, "
             f"load average {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f}",
             "", "| users | ours: label p50 | ours: first token p50 / p95 | llama-server (bare reply): first token "
             "p50 / p95 | ours: aggregate tok/s (per stream) | llama-server | aggregate ratio | messages/s: ours / "
             "llama-server (tokens a reply) |",
             "|---|---|---|---|---|---|---|---|"]
    for o in r["ours"]:
        p = peer.get(o["users"])
        ms = lambda x: f"{x * 1000:.0f}"  # noqa: E731
        lines.append(
            f"| {o['users']} | {ms(o['label_p50_s'])} ms | {ms(o['ttft_p50_s'])} / {ms(o['ttft_p95_s'])} ms | "
            + (f"{ms(p['ttft_p50_s'])} / {ms(p['ttft_p95_s'])} ms | " if p else "– | ")
            + f"{o['aggregate_tps']:.1f} ({o['per_stream_tps']:.1f}) | "
            + (f"{p['aggregate_tps']:.1f} ({p['per_stream_tps']:.1f}) | {o['aggregate_tps'] / p['aggregate_tps']:.2f} |"
               if p else "– | – |")
            + (f" {o['messages_per_s']:.2f} ({o['tokens'] / o['messages']:.0f}) / {p['messages_per_s']:.2f} "
               f"({p['tokens'] / p['messages']:.0f}) |" if p and "messages_per_s" in o else " – |"))
    alone, one = r.get("runtime_alone"), next((o for o in r["ours"] if o["users"] == 1), None)
    if alone and one:
        lines += ["", f"The runtime alone (the 1-user messages through `AllInOne.respond` in the bench's process): "
                      f"label p50 {alone['label_p50_s'] * 1000:.0f} ms, first token p50 {alone['ttft_p50_s'] * 1000:.0f}"
                      f" ms; HTTP, the app and the client add {(one['ttft_p50_s'] - alone['ttft_p50_s']) * 1000:.0f} ms "
                      "to the first token"]
    lines += ["", f"App RSS: {r['app_rss_start_mb']:.0f} MB after start, {r['app_rss_end_mb']:.0f} MB after "
                  f"{r['turns']} turns"
              + (f"; {r['api_only_rss_start_mb']:.0f} MB after start without the page (`--no-page`)"
                 if r.get("api_only_rss_start_mb") else "")]
    if r["llama_server"] is None:
        lines.append("llama-server: not measured (no binary; `make llama-server` builds it)")
    else:
        lines.append(f"llama-server RSS at the end: {r['llama_server']['rss_mb']:.0f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--rounds", type=int, default=8, help="messages per user (default 8)")
    p.add_argument("--tokens", type=int, default=REPLY_TOKENS, help=f"new tokens per reply (default {REPLY_TOKENS})")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER,
                   help=f"llama-server binary for the peer column (default: {LLAMA_SERVER}, made by make llama-server)")
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"{args.model}: no such model file")
    if not args.llama_server.is_file():
        print(f"note: {args.llama_server} not found: the llama-server column is skipped (make llama-server)")
    result = measure(args.model, args.threads, args.users, args.rounds, args.tokens, args.llama_server)
    text = render(result)
    print(text)
    path = write_result("messages", args.model, result, text)
    print(f"\nwritten: {path.relative_to(ROOT)} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
