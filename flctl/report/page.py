"""The report page: one HTML file that needs nothing but itself.

The figures are embedded as base64 `data:` URIs (the same PNGs are also
written beside the page), the style is inline, and there is no script,
font or link to fetch: the page opens offline, from a mail attachment or
an archive. Its Content-Security-Policy forbids any fetch and any script,
and every piece of text from the run (run ids, host names, drop reasons:
hosts chose them) is HTML-escaped, so a hostile name shows as the text it
is.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from typing import Any

from flctl.core.text import clean_text
from flctl.report.data import RunData, number, round_ranges
from flctl.report.figures import Drawn

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
.warning { color: #8a5a00; }
"""


def text(value: Any) -> str:
    """Run-supplied text as HTML: control characters removed, markup escaped."""
    return html.escape(clean_text(value), quote=True)


def _fmt(value: Any, spec: str = ".4g") -> str:
    found = number(value)
    return "-" if found is None else format(found, spec)


def _bytes(records: Sequence[dict[str, Any]]) -> str:
    total = sum((number(r.get("bytes_sent")) or 0) + (number(r.get("bytes_received")) or 0)
                for r in records)
    return f"{total / 1e6:,.1f} MB"


def _summary(runs: Sequence[RunData]) -> str:
    head = ("run", "state", "rounds", "hosts", "accuracy", "eval loss", "epsilon (delta)",
            "strategy", "time", "traffic")
    rows = []
    for run in runs:
        info, last = run.info, run.records[-1]
        training = run.manifest.get("training") if isinstance(run.manifest.get("training"),
                                                               dict) else {}
        accuracy = number(info.accuracy)
        epsilon = "-" if number(info.epsilon) is None else \
            f"{_fmt(info.epsilon, '.3g')} ({_fmt(info.delta, 'g')})"
        seconds = sum(number(r.get("seconds")) or 0 for r in run.records)
        cells = [text(run.run_id), text(info.state), str(len(run.records)), str(len(run.hosts)),
                 "-" if accuracy is None else f"{100 * accuracy:.2f}%",
                 _fmt(last.get("eval_loss")), epsilon, text(training.get("strategy", "-")),
                 f"{seconds:,.1f} s", _bytes(run.records)]
        rows.append("<tr>" + "".join(
            f'<td class="num">{c}</td>' if i >= 2 and i != 7 else f"<td>{c}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    return (f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>"
            f"{''.join(rows)}</table>")


def _drops(run: RunData) -> str:
    rows = run.drop_rows()
    if not rows:
        return "<p>Every sampled host answered every round.</p>"
    body = "".join(f"<tr><td>{text(r.host)}</td><td>{text(r.status)}</td>"
                   f"<td>{text(r.reason) or '-'}</td><td>{len(r.rounds)}</td>"
                   f"<td>{text(round_ranges(r.rounds))}</td></tr>" for r in rows)
    return ("<table><tr><th>host</th><th>status</th><th>reason</th><th>rounds</th>"
            f"<th>which</th></tr>{body}</table>")


def _figure(drawn: Drawn) -> str:
    data = base64.b64encode(drawn.png).decode("ascii")
    return (f'<figure id="{drawn.name}"><img src="data:image/png;base64,{data}" '
            f'alt="{text(drawn.title)}"><figcaption>{text(drawn.title)}</figcaption></figure>')


def render_page(runs: Sequence[RunData], figures: Sequence[Drawn],
                warnings: Sequence[str], generated: float | None = None) -> str:
    """The whole page as a string."""
    ids = ", ".join(run.run_id for run in runs)
    title = f"flctl report: {ids}" if len(runs) == 1 else f"flctl report: {len(runs)} runs"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{text(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{text(title)}</h1>",
        f"<p>Made by <code>flctl report</code> at {stamp} from each run's metrics.jsonl.</p>",
        _summary(runs),
    ]
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(
            f'<li class="warning">{text(w)}</li>' for w in warnings) + "</ul>")
    parts.append("<h2>Figures</h2>")
    parts += [_figure(drawn) for drawn in figures]
    parts.append("<h2>Hosts that missed rounds</h2>")
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{text(run.run_id)}</h3>")
        if not run.has_host_records:
            parts.append("<p>This run's records predate per-host records: answered and "
                         "dropped come from each round's participants and drops.</p>")
        parts.append(_drops(run))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
