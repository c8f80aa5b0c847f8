"""report.html of the wellbeing watch (watch.py): one self-contained page, inline CSS and inline SVG, with no
script, font, image or link to fetch, so it opens offline (from a file, an archive, a mail attachment). Every
text from the input is HTML-escaped.

People with an alert come first. Each person has a chart (x: time, or message order without --time; dots:
P(负面) of each message, red when it counts under the rule; line: the rolling share of counting negatives; shaded:
the alert stretches) and each alert is listed with the messages that made it fire.

    >>> from allinone_gguf.faces.watch_report import esc
    >>> esc('<b onclick="x">&')
    '&lt;b onclick=&quot;x&quot;&gt;&amp;'
"""
from __future__ import annotations

import datetime
import html
import os
from pathlib import Path

from ..scoring import NEGATIVE

W, H = 720, 130                     # chart size in CSS pixels
LEFT, RIGHT, TOP, BOTTOM = 38, 10, 8, 22
TITLE_CHARS = 120                   # a dot's tooltip shows this much of the text

CSS = """
body{font-family:system-ui,"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;margin:0 auto;
max-width:980px;padding:16px 20px;color:#1d2330;background:#fafafa;line-height:1.45}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:.2em 0}
.meta,.note{color:#555;font-size:.92em}.note{border-left:3px solid #e0a800;padding-left:8px}
table{border-collapse:collapse;font-size:.9em;width:100%;background:#fff}
th,td{border-bottom:1px solid #e3e3e3;padding:3px 6px;text-align:right}th{background:#f0f2f5}
td.name,th.name{text-align:left}tr.alert td{background:#fff1f0}
section.person{background:#fff;border:1px solid #e3e3e3;border-radius:6px;margin:14px 0;padding:10px 14px}
section.person.alert{border-color:#e5534b}
.badge{display:inline-block;font-size:.75em;padding:1px 7px;border-radius:9px;margin-left:6px;
vertical-align:middle;background:#e8f5e9;color:#1b5e20}.badge.alert{background:#e5534b;color:#fff}
.badge.now{background:#8b0000;color:#fff}
svg{display:block;max-width:100%;height:auto}
.alertbox{border-left:3px solid #e5534b;margin:8px 0;padding:2px 10px;background:#fff8f7}
.alertbox ol{margin:4px 0;padding-left:22px}.alertbox li{margin:2px 0}
.when{color:#666;font-size:.85em;white-space:nowrap}.lab{font-size:.85em;color:#b3261e;white-space:nowrap}
.key span{display:inline-block;margin-right:14px}
.dot{display:inline-block;width:9px;height:9px;border-radius:5px;margin-right:4px;vertical-align:middle}
"""
COLOURS = {"count": "#d93025", "negative": "#f29900", "positive": "#1e8e3e"}


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _xs(rows) -> list[float]:
    """x of each row's dot: by time when the rows have times, else by order."""
    span = W - LEFT - RIGHT
    keys = [r.at for r in rows] if rows[0].wall is not None else list(range(len(rows)))
    lo, hi = min(keys), max(keys)
    if hi == lo:
        return [LEFT + span / 2] * len(rows)
    return [LEFT + span * (k - lo) / (hi - lo) for k in keys]


def _y(p: float) -> float:
    return TOP + (1 - p) * (H - TOP - BOTTOM)


def chart(person) -> str:
    """The person's inline SVG: P(负面) per message, the rolling share, alert stretches shaded."""
    rows, xs = person.rows, _xs(person.rows)
    x_of = {r.n: x for r, x in zip(rows, xs)}
    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'aria-label="{esc(person.name)}: P(负面) per message">',
           f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="#f7f8fa"/>']
    for a in person.alerts:
        x0, x1 = x_of[a.since], x_of[a.until]
        out.append(f'<rect class="alert-span" x="{x0 - 4:.1f}" y="{TOP}" width="{max(x1 - x0, 0) + 8:.1f}" '
                   f'height="{H - TOP - BOTTOM}" fill="#e5534b" fill-opacity="0.18"><title>alert: '
                   f'{esc(a.reason)}</title></rect>')
    for p in (0, 0.5, 1):
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{_y(p):.1f}" y2="{_y(p):.1f}" stroke="#c8ccd2" '
                   f'stroke-dasharray="{"3,3" if p == 0.5 else "none"}"/>'
                   f'<text x="{LEFT - 4}" y="{_y(p) + 4:.1f}" font-size="10" text-anchor="end" '
                   f'fill="#666">{p:g}</text>')
    points = " ".join(f"{x:.1f},{_y(s):.1f}" for x, s in zip(xs, person.share))
    out.append(f'<polyline class="share" points="{points}" fill="none" stroke="#3056d3" stroke-width="1.6"/>')
    for r, x, c in zip(rows, xs, person.counting):
        colour = COLOURS["count" if c else "negative" if r.label == NEGATIVE else "positive"]
        tip = f"line {r.ref} · {r.when() or f'row {r.n}'} · {r.label} {r.confidence:.2f} · {r.text[:TITLE_CHARS]}"
        out.append(f'<circle cx="{x:.1f}" cy="{_y(r.p_negative):.1f}" r="2.8" fill="{colour}">'
                   f'<title>{esc(tip)}</title></circle>')
    first, last = rows[0], rows[-1]
    left = first.wall.date().isoformat() if first.wall else "message 1"
    right = last.wall.date().isoformat() if last.wall else f"message {len(rows)}"
    out.append(f'<text x="{LEFT}" y="{H - 6}" font-size="10" fill="#666">{esc(left)}</text>'
               f'<text x="{W - RIGHT}" y="{H - 6}" font-size="10" text-anchor="end" fill="#666">{esc(right)}</text>'
               "</svg>")
    return "".join(out)


def _alert_box(person, a, k: int) -> str:
    at = {r.n: r for r in person.rows}
    since, until = at[a.since], at[a.until]
    span = (f"{since.when()} – {until.when()}" if since.wall else f"line {since.ref} – line {until.ref}")
    items = "".join(f'<li><span class="when">line {esc(m.ref)}{" · " + esc(m.when()) if m.wall else ""}</span> '
                    f'<span class="lab">{esc(m.label)} {m.confidence:.2f}</span> {esc(m.text)}</li>'
                    for m in (at[n] for n in a.messages))
    return (f'<div class="alertbox"><b>Alert {k}</b> <span class="when">{esc(span)}</span><br>{esc(a.reason)}; '
            f"the messages that made it fire:<ol>{items}</ol></div>")


def _section(person, i: int) -> str:
    s = person.summary()
    badge = ('<span class="badge now">alert, still holding</span>' if person.active else
             '<span class="badge alert">alert</span>' if person.alerts else '<span class="badge">no alert</span>')
    stats = (f'{s["messages"]} messages, {s["negatives"]} 负面 ({s["share_negative"]:.0%}), '
             f'{s["counting_negatives"]} counting, longest run {s["longest_negative_run"]}'
             + (f', {s["first_time"]} – {s["last_time"]}' if s["first_time"] else ""))
    boxes = "".join(_alert_box(person, a, k) for k, a in enumerate(person.alerts, 1))
    return (f'<section class="person{" alert" if person.alerts else ""}" id="p{i}"><h2>{esc(person.name)}{badge}</h2>'
            f'<div class="meta">{esc(stats)}</div>{chart(person)}{boxes}</section>')


def _table(people) -> str:
    head = ("<tr><th class=name>person</th><th>messages</th><th>负面</th><th>share</th><th>longest run</th>"
            "<th>last message</th><th>alerts</th></tr>")
    body = []
    for i, p in enumerate(people):
        s = p.summary()
        body.append(f'<tr class="{"alert" if p.alerts else ""}"><td class=name><a href="#p{i}">{esc(p.name)}</a></td>'
                    f'<td>{s["messages"]}</td><td>{s["negatives"]}</td><td>{s["share_negative"]:.0%}</td>'
                    f'<td>{s["longest_negative_run"]}</td><td>{esc(s["last_time"] or "–")}</td>'
                    f'<td>{s["alerts"]}{" (now)" if p.active else ""}</td></tr>')
    return f'<table id="people">{head}{"".join(body)}</table>'


def render(people, rule, meta: dict) -> str:
    """The whole page. `meta`: inputs, labels, model, rows, bad (["file: line N: why"]), unlabelled, times, rule."""
    flagged = [p for p in people if p.alerts]
    n_alerts = sum(len(p.alerts) for p in people)
    key = "".join(f'<span><i class="dot" style="background:{COLOURS[k]}"></i>{esc(t)}</span>' for k, t in (
        ("count", f"负面, confidence ≥ {rule.min_confidence} (counts)"), ("negative", "负面, below that"),
        ("positive", "正面"))) + ('<span><i class="dot" style="background:#3056d3;border-radius:0;height:3px"></i>'
                                 f"share of counting negatives over the last {rule.trend_window}</span>"
                                 '<span><i class="dot" style="background:#e5534b;opacity:.3;border-radius:0"></i>'
                                 "alert</span>")
    left = ""
    if meta["bad"] or meta["unlabelled"]:
        items = "".join(f"<li>{esc(b)}</li>" for b in meta["bad"])
        left = (f'<section id="left-out"><h2>Rows left out of the alerts</h2><ul>{items}</ul>'
                + (f'<p class="meta">{meta["unlabelled"]} rows without a label (their error is in '
                   f'{esc(meta["labels"])})</p>' if meta["unlabelled"] else "") + "</section>")
    order = "" if meta["times"] else " No --time: messages in input order, the day-streak rule off."
    return f"""<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Wellbeing watch: {n_alerts} alerts for {len(flagged)} of {len(people)} people</title><style>{CSS}</style></head>
<body><header><h1>Wellbeing watch</h1>
<p class="meta">{meta["rows"]} rows from {esc(", ".join(meta["inputs"]))} · {len(people)} people ·
<b>{n_alerts} alerts for {len(flagged)} people</b> ({sum(p.active for p in people)} still holding at their last
message) · labels {esc(meta["labels"])} by {esc(meta["model"])} · written {datetime.date.today().isoformat()}</p>
<p class="meta">Rule: {esc(meta["rule"])}.{esc(order)}</p>
<p class="note">The labels come from a small language model: an alert is a reason for a person to look and
perhaps check in, not a diagnosis. Read the messages under each alert.</p>
<p class="meta key">{key}</p></header>
<h2>People (with alerts first)</h2>{_table(people)}
{"".join(_section(p, i) for i, p in enumerate(people))}
{left}
</body></html>
"""


def write_report(path: Path, people, rule, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(people, rule, meta), encoding="utf-8")
    os.replace(tmp, path)
