"""The report's figures, drawn with matplotlib's Agg canvas into PNG bytes.

No pyplot: each figure is a `matplotlib.figure.Figure` on its own
FigureCanvasAgg, so nothing touches matplotlib's global state (backend,
open figures) and no display is needed. Host names and run ids are drawn
as literal text (`$` would otherwise start mathtext), cut to a sane length.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from flctl.core.text import clean_text
from flctl.report.data import ANSWERED, DROPPED, NOT_SAMPLED, STATUSES, STRAGGLED, RunData

DPI = 100
WIDTH = 9.0
HEIGHT = 3.6
MAX_LABEL = 40
MAX_HOST_TICKS = 60
LEGEND_AT = 0.74  # legends sit right of the axes (placing them "best" is slow and covers data)
STATUS_COLOURS = {ANSWERED: "#4c9a2a", STRAGGLED: "#f2a33a", DROPPED: "#c8312b",
                  NOT_SAMPLED: "#e4e4e4"}


@dataclass(frozen=True)
class Drawn:
    name: str      # file stem: <name>.png
    title: str
    png: bytes


def label(text: object) -> str:
    """Run-supplied text as matplotlib draws it literally (a leading `_` would
    hide it from a legend, a `$` start mathtext)."""
    value = clean_text(text)
    if len(value) > MAX_LABEL:
        value = value[:MAX_LABEL - 1] + "…"
    if value.startswith("_"):
        value = " " + value
    return value.replace("$", r"\$")


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(width: float = WIDTH, height: float = HEIGHT, left: float = 0.07,
            right: float = LEGEND_AT - 0.02) -> Figure:
    """Fixed margins, not constrained layout: that would double each figure's time."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    figure.subplots_adjust(left=left, right=right, bottom=0.6 / height,
                           top=1 - 0.25 / height, wspace=0.25)
    return figure


def _xy(rounds: Sequence[int], values: Sequence[float | None]) -> tuple[list[int], list[float]]:
    pairs = [(r, v) for r, v in zip(rounds, values) if v is not None]
    return [r for r, _ in pairs], [v for _, v in pairs]


def _plot(ax, rounds, values, **style) -> bool:
    xs, ys = _xy(rounds, values)
    if xs:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, **style)
    return bool(xs)


def _finish(ax, ylabel: str, drew: bool, legend: bool = True) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not drew:
        ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center",
                color="grey")
    elif legend and ax.get_legend_handles_labels()[0]:
        _legend(ax)


def _legend(ax, **extra) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False,
              **extra)


def quality(runs: Sequence[RunData]) -> Drawn:
    """Accuracy (federated, and central when evaluated) and eval loss per round."""
    figure = _figure()
    acc, loss = figure.subplots(1, 2)
    drew_acc = drew_loss = False
    for run in runs:
        prefix = f"{label(run.run_id)}: " if len(runs) > 1 else ""
        line = acc.plot([], [])[0]
        colour = line.get_color()
        drew_acc |= _plot(acc, run.rounds, run.series("accuracy"), color=colour,
                          label=f"{prefix}federated")
        drew_acc |= _plot(acc, run.rounds, run.series("central_accuracy"), color=colour,
                          linestyle="--", label=f"{prefix}central")
        drew_loss |= _plot(loss, run.rounds, run.series("eval_loss"), color=colour,
                           label=f"{prefix}federated")
        drew_loss |= _plot(loss, run.rounds, run.series("central_loss"), color=colour,
                           linestyle="--", label=f"{prefix}central")
    _finish(acc, "accuracy", drew_acc, legend=False)
    _finish(loss, "eval loss", drew_loss)
    return Drawn("quality", "Accuracy and evaluation loss per round", _png(figure))


def train_loss(runs: Sequence[RunData]) -> Drawn:
    """The federation's train loss; for one run, each host's too (thin lines)."""
    figure = _figure()
    ax = figure.subplots()
    drew = False
    if len(runs) == 1:
        for values in runs[0].host_series("train_loss").values():
            drew |= _plot(ax, runs[0].rounds, values, linewidth=0.8, alpha=0.35,
                          color="grey")
        if drew:
            ax.plot([], [], linewidth=0.8, alpha=0.35, color="grey", label="each host")
    for run in runs:
        name = label(run.run_id) if len(runs) > 1 else "federation (weighted)"
        drew |= _plot(ax, run.rounds, run.series("train_loss"), linewidth=2, label=name)
    _finish(ax, "train loss", drew)
    return Drawn("train_loss", "Train loss per round", _png(figure))


def participation(run: RunData) -> Drawn:
    """Hosts x rounds: answered, straggled (missed the deadline), dropped, not sampled.
    A round with no record (a gap in metrics.jsonl) stays blank."""
    hosts = run.hosts
    height = min(max(2.4, 0.22 * len(hosts) + 1.4), 12.0)
    ticks = len(hosts) <= MAX_HOST_TICKS
    widest = max((len(label(h)) for h in hosts), default=3) if ticks else 8
    figure = _figure(height=height, left=min(0.4, 0.03 + widest * 0.0068))
    ax = figure.subplots()
    first, last = run.rounds[0], run.rounds[-1]
    if hosts:
        codes = np.full((len(hosts), last - first + 1), np.nan)
        for row, host in enumerate(hosts):
            for round_number, status in zip(run.rounds, run.participation[host]):
                codes[row, round_number - first] = STATUSES.index(status)
        ax.imshow(codes, cmap=ListedColormap([STATUS_COLOURS[s] for s in STATUSES]), vmin=0,
                  vmax=len(STATUSES) - 1, aspect="auto", interpolation="nearest",
                  extent=(first - 0.5, last + 0.5, len(hosts) - 0.5, -0.5))
    else:
        _finish(ax, "hosts", False)
    if ticks:
        ax.set_yticks(range(len(hosts)), [label(h) for h in hosts], fontsize="small")
    else:
        ax.set_ylabel(f"{len(hosts)} hosts, in the run's order")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax, handles=[Patch(color=STATUS_COLOURS[s], label=s) for s in STATUSES])
    return Drawn("participation", "Participation: each host in each round", _png(figure))


def answered(runs: Sequence[RunData]) -> Drawn:
    """Comparing runs: how many hosts answered each round."""
    figure = _figure()
    ax = figure.subplots()
    drew = False
    for run in runs:
        counts = [sum(run.participation[h][i] == ANSWERED for h in run.hosts)
                  for i in range(len(run.rounds))]
        drew |= _plot(ax, run.rounds, counts, label=label(run.run_id))
    _finish(ax, "hosts answered", drew)
    return Drawn("answered", "Hosts that answered each round", _png(figure))


def round_time(runs: Sequence[RunData]) -> Drawn:
    """Round wall time split into the slowest host's compute and everything else."""
    figure = _figure()
    ax = figure.subplots()
    if len(runs) == 1:
        run = runs[0]
        # stacked steps, one per round: a bar chart without one artist per bar
        # (a round missing from the records stays empty)
        first, last = run.rounds[0], run.rounds[-1]
        total, compute = [0.0] * (last - first + 1), [0.0] * (last - first + 1)
        for number, seconds, slowest in zip(run.rounds, run.series("seconds"),
                                            run.series("max_compute_s")):
            total[number - first] = seconds or 0.0
            compute[number - first] = min(slowest or 0.0, seconds or 0.0)
        edges = [r - 0.5 for r in range(first, last + 2)]
        ax.stairs(compute, edges, fill=True, color="#3b75af", label="slowest host's compute")
        ax.stairs(total, edges, baseline=compute, fill=True, color="#f2a33a",
                  label="overhead (transfer,\naggregation, waiting)")
        points = [_xy(run.rounds, values) for values in run.host_series("fit_s").values()]
        if points:
            ax.scatter([x for xs, _ in points for x in xs], [y for _, ys in points for y in ys],
                       s=4, color="black", alpha=0.4, label="each host's compute")
        ax.set_ylim(bottom=0)
        _finish(ax, "seconds", True)
    else:
        drew = False
        for run in runs:
            line = ax.plot([], [])[0]
            drew |= _plot(ax, run.rounds, run.series("seconds"), color=line.get_color(),
                          label=f"{label(run.run_id)}: round")
            drew |= _plot(ax, run.rounds, run.series("max_compute_s"), color=line.get_color(),
                          linestyle="--", label=f"{label(run.run_id)}: slowest compute")
        _finish(ax, "seconds", drew)
    return Drawn("round_time", "Round time: the slowest host's compute and the overhead",
                 _png(figure))


def traffic(runs: Sequence[RunData]) -> Drawn:
    """Bytes the coordinator sent to and received from the hosts, per round."""
    figure = _figure()
    ax = figure.subplots()
    drew = False
    keys = (("bytes_sent", "-", "sent"), ("bytes_received", "--", "received"))
    peak = max((v or 0.0 for run in runs for key, _, _ in keys for v in run.series(key)),
               default=0.0)
    scale, unit = next(((10.0 ** p, u) for p, u in ((9, "GB"), (6, "MB"), (3, "KB"))
                        if peak >= 10.0 ** p), (1.0, "bytes"))
    for run in runs:
        prefix = f"{label(run.run_id)}: " if len(runs) > 1 else ""
        line = ax.plot([], [])[0]
        for key, style, what in keys:
            scaled = [None if v is None else v / scale for v in run.series(key)]
            drew |= _plot(ax, run.rounds, scaled, color=line.get_color(), linestyle=style,
                          label=f"{prefix}{what}")
    ax.set_ylim(bottom=0)
    _finish(ax, f"{unit} per round", drew)
    return Drawn("traffic", "Bytes sent to and received from the hosts per round",
                 _png(figure))


def epsilon(runs: Sequence[RunData]) -> Drawn:
    """Differential privacy spent so far (epsilon at the run's delta)."""
    figure = _figure()
    ax = figure.subplots()
    drew = False
    for run in runs:
        delta = next((d for d in run.series("delta") if d is not None), None)
        at = f" (delta {delta:g})" if delta is not None else ""
        name = f"{label(run.run_id)}{at}" if len(runs) > 1 else f"epsilon{at}"
        drew |= _plot(ax, run.rounds, run.series("epsilon"), label=name)
    _finish(ax, "epsilon spent", drew)
    return Drawn("epsilon", "Privacy spent: epsilon over rounds", _png(figure))


def plans(runs: Sequence[RunData]) -> list[tuple[str, Callable[[], Drawn]]]:
    """The figures a report of `runs` has, in page order, each as (name, draw())."""
    steps: list[tuple[str, Callable[[], Drawn]]] = [("quality", lambda: quality(runs)),
                                       ("train_loss", lambda: train_loss(runs))]
    if len(runs) == 1:
        steps.append(("participation", lambda: participation(runs[0])))
    else:
        steps.append(("answered", lambda: answered(runs)))
    steps += [("round_time", lambda: round_time(runs)), ("traffic", lambda: traffic(runs))]
    if any(run.has_epsilon for run in runs):
        steps.append(("epsilon", lambda: epsilon(runs)))
    return steps
