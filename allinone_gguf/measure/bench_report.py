"""Turn a `make bench` report (the dict written to bench/results/*.json) into Markdown and a PNG chart.

    python -c "import json, sys; from allinone_gguf.bench_report import render_markdown; \\
               print(render_markdown(json.load(open(sys.argv[1]))))" bench/results/2025-01-01-host.json

The chart is drawn with Pillow (already installed with gradio), so the benchmark needs no plotting library.
"""
from __future__ import annotations

import math
from pathlib import Path

LENGTHS = ("short", "medium", "long")
COLORS = ("#3b6fb6", "#e08a2c", "#4f9d55", "#b84a4a", "#7d5aa6", "#6b6b6b")


def _get(entry: dict, *keys, default=None):
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return default
        entry = entry[key]
    return entry


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else None


def mean_accuracy(entry: dict) -> float | None:
    values = [_num(a.get("accuracy")) for a in (entry.get("accuracy") or {}).values()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# (row title, getter, format, "higher is better") for the main table and the ratios
METRICS = [
    ("file size (MB)", lambda e: e.get("size_mb"), "{:.0f}", False),
    ("load time (s)", lambda e: _get(e, "load", "seconds"), "{:.2f}", False),
    ("peak RSS after load (MB)", lambda e: _get(e, "load", "peak_rss_mb_after_load"), "{:.0f}", False),
    ("peak RSS after chat (MB)", lambda e: _get(e, "load", "peak_rss_mb_after_chat"), "{:.0f}", False),
    *[(f"sentiment p50, {k} (ms)", (lambda k: lambda e: _get(e, "sentiment", "alone", k, "p50_ms"))(k), "{:.0f}",
       False) for k in LENGTHS],
    *[(f"sentiment p95, {k} (ms)", (lambda k: lambda e: _get(e, "sentiment", "alone", k, "p95_ms"))(k), "{:.0f}",
       False) for k in LENGTHS],
    *[(f"sentiment p50 between chat turns, {k} (ms)",
       (lambda k: lambda e: _get(e, "sentiment", "interleaved", k, "p50_ms"))(k), "{:.0f}", False) for k in LENGTHS],
    ("time to first reply token p50 (ms)", lambda e: _get(e, "reply", "ttft_ms_p50"), "{:.0f}", False),
    ("generation (tokens/s)", lambda e: _get(e, "reply", "gen_tokens_per_s"), "{:.1f}", True),
    ("prompt processing (tokens/s)", lambda e: _get(e, "reply", "prompt_tokens_per_s"), "{:.0f}", True),
    ("full turn p50: sentiment + reply (s)", lambda e: _get(e, "reply", "turn_s_p50"), "{:.2f}", False),
    ("accuracy, mean over data sets", mean_accuracy, "{:.1%}", True),
    ("invalid sentiment outputs", lambda e: sum(a.get("invalid", 0) for a in (e.get("accuracy") or {}).values())
     if e.get("accuracy") else None, "{:d}", False),
]


def reference_index(models: list[dict]) -> int:
    """The model the others are compared with: F16 if present, else Q8_0, else the first."""
    quants = [m.get("quant") for m in models]
    for q in ("F16", "BF16", "F32", "Q8_0"):
        if q in quants and "error" not in models[quants.index(q)]:
            return quants.index(q)
    return 0


def ratios(models: list[dict]) -> dict:
    """Every other model's metrics divided by the reference's (accuracy: difference in points)."""
    if len(models) < 2:
        return {}
    ref = models[reference_index(models)]
    out = {"reference": ref.get("quant"), "models": {}}
    for m in models:
        if m is ref or "error" in m:
            continue
        row = {}
        for title, get, _, _ in METRICS:
            a, b = _num(get(m)), _num(get(ref))
            if a is None or b is None:
                continue
            if title.startswith("accuracy"):
                row[title + " (points vs reference)"] = (a - b) * 100
            elif b and not title.startswith("invalid"):
                row[title] = a / b
        out["models"][m.get("quant") or m.get("file")] = row
    return out


def _fmt(value, fmt: str) -> str:
    value = _num(value)
    return "–" if value is None else fmt.format(value)


def render_markdown(report: dict) -> str:
    c = report["conditions"]
    entries = list(report["models"]) + ([report["baseline"]] if report.get("baseline") else [])
    ok = [m for m in report["models"] if "error" not in m]
    ref = ok[reference_index(ok)] if len(ok) > 1 else None
    names = [f"{m.get('quant')}" for m in entries]
    lines = [f"## Benchmark {c['date'][:10]} on {c['host']}", "",
             f"- CPU: {c['cpu']} ({c['logical_cpus']} logical CPUs, {c['physical_cores'] or '?'} cores); "
             f"threads {c['n_threads']}, context {c['n_ctx']} tokens, sentiment prompt `{c['sentiment_prompt']}`",
             f"- llama-cpp-python {c['llama_cpp_python']}, Python {c['python']}, commit {c.get('git') or '?'}; "
             f"load average {' / '.join(f'{x:.2f}' for x in c['loadavg_start'])} at start, "
             f"{' / '.join(f'{x:.2f}' for x in c.get('loadavg_end', [])) or '?'} at the end",
             "- models: " + ", ".join(f"`{m['file']}`" + (f" (sentiment by `{m['sentiment_adapter']}`)"
                                                         if m.get("sentiment_adapter") else "") for m in entries),
             f"- warm-up left out; {report['runs']} timed classifications per length, {report['turns']} chat turns "
             f"per length with replies of at most {report['reply_tokens']} tokens; message lengths "
             + ", ".join(f"{k} ≈{v['mean_chars']:.0f} chars" for k, v in report["texts"].items()),
             f"- command: `{report['command']}`", ""]
    if ref is not None:
        others = [m for m in ok if m is not ref]
        head = names + [f"{m.get('quant')} / {ref.get('quant')}" for m in others]
    else:
        others, head = [], names
    lines += ["| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for title, get, fmt, _ in METRICS:
        cells = [_fmt(get(m), fmt) if "error" not in m else "failed" for m in entries]
        for m in others:
            a, b = _num(get(m)), _num(get(ref))
            if title.startswith("accuracy"):
                cells.append("–" if a is None or b is None else f"{(a - b) * 100:+.1f} points")
            else:
                cells.append("–" if a is None or not b or title.startswith("invalid") else f"{a / b:.2f}×")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    datasets = sorted({d for m in entries for d in (m.get("accuracy") or {})})
    if datasets:
        lines += ["", "Accuracy per data set (recall 正面 / 负面; invalid outputs):", "",
                  "| data set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for d in datasets:
            cells = []
            for m in entries:
                a = (m.get("accuracy") or {}).get(d)
                if not a:
                    cells.append("–")
                    continue
                r = a["recall"]
                cells.append(f"{a['accuracy']:.1%} ({_fmt(r.get('正面'), '{:.0%}')} / "
                             f"{_fmt(r.get('负面'), '{:.0%}')}; {a['invalid']}) n={a['n']}")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    for m in entries:
        if "error" in m:
            lines.append(f"\n`{m['file']}`: {m['error']}")
    if report.get("baseline"):
        lines.append(f"\nBaseline: {report['baseline'].get('engine', '')}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ PNG

def font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _panel(draw, box, title, groups, series, values, fmt) -> None:
    """Grouped bars in box = (x0, y0, x1, y1): one group per `groups`, one bar per series (model)."""
    x0, y0, x1, y1 = box
    big, small = font(15), font(11)
    draw.text((x0, y0), title, fill="black", font=big)
    top, bottom = y0 + 30, y1 - 28
    draw.line((x0, bottom, x1, bottom), fill="#888888")
    finite = [v for row in values for v in row if _num(v) is not None]
    vmax = max(finite) * 1.18 if finite and max(finite) > 0 else 1.0
    gw = (x1 - x0) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for gi, g in enumerate(groups):
        gx = x0 + gi * gw + gw * 0.1
        for si in range(len(series)):
            v = _num(values[si][gi])
            if v is None:
                continue
            bx = gx + si * bw
            h = (bottom - top) * v / vmax
            draw.rectangle((bx, bottom - h, bx + bw - 2, bottom), fill=COLORS[si % len(COLORS)])
            label = fmt.format(v)
            draw.text((bx + (bw - 2) / 2, bottom - h - 2), label, fill="black", font=small, anchor="md")
        draw.text((x0 + gi * gw + gw / 2, bottom + 6), g, fill="black", font=small, anchor="ma")


def render_png(report: dict, path: Path) -> Path | None:
    """Sentiment latency, memory and chat-turn time per model (top) and accuracy per data set (bottom); None without Pillow."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    entries = [m for m in report["models"] if "error" not in m]
    if report.get("baseline"):
        entries.append(report["baseline"])
    names = [f"{m.get('quant')} ({m['file']})" for m in entries]
    width, height = 1500, 900
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    c = report["conditions"]
    draw.text((20, 12), f"make bench, {c['date'][:10]}: {c['cpu']}, {c['n_threads']} threads, "
                        f"context {c['n_ctx']}, load average {c['loadavg_start'][0]:.2f}",
              fill="black", font=font(17))
    x = 20
    for i, name in enumerate(names):
        draw.rectangle((x, 44, x + 14, 58), fill=COLORS[i % len(COLORS)])
        draw.text((x + 20, 43), name, fill="black", font=font(14))
        x += 40 + int(draw.textlength(name, font=font(14)))
    third = (width - 80) // 3
    _panel(draw, (20, 80, 20 + third, 440), "sentiment latency p50 (ms)", list(LENGTHS), names,
           [[_get(m, "sentiment", "alone", k, "p50_ms") for k in LENGTHS] for m in entries], "{:.0f}")
    _panel(draw, (40 + third, 80, 40 + 2 * third, 440), "peak RSS (MB)", ["after load", "after chat"], names,
           [[_get(m, "load", "peak_rss_mb_after_load"), _get(m, "load", "peak_rss_mb_after_chat")]
            for m in entries], "{:.0f}")
    _panel(draw, (60 + 2 * third, 80, width - 20, 440), "chat turn p50 (s)", ["first reply token", "full turn"],
           names, [[(_get(m, "reply", "ttft_ms_p50") or math.nan) / 1000, _get(m, "reply", "turn_s_p50")]
                   for m in entries], "{:.2f}")
    datasets = sorted({d for m in entries for d in (m.get("accuracy") or {})})
    if datasets:
        _panel(draw, (20, 480, width - 20, height - 10), "accuracy per data set (%)",
               [d.split(".")[0] for d in datasets], names,
               [[(_get(m, "accuracy", d, "accuracy") or 0) * 100 if _get(m, "accuracy", d) else None
                 for d in datasets] for m in entries], "{:.1f}")
    img.save(path)
    return path
