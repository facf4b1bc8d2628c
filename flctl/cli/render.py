"""Rich tables and JSON output. The only module besides app.py that prints.

Anything that came from a host (errors, states, versions, reasons, log
lines) is shown as a rich Text, never parsed as markup, with control
characters removed (flctl.core.text): a host cannot restyle, garble or
crash the operator's terminal.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flctl.coordinator.records import RunInfo
from flctl.coordinator.summary import RoundRecord
from flctl.core.fedstats import FederatedStats
from flctl.core.text import clean_text
from flctl.deploy.results import HostResult

# Results go to stdout; progress, logs and errors to stderr, so `--json`
# output stays one clean document for scripts.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

STATUS_STYLE = {"ok": "green", "changed": "yellow", "failed": "red", "unreachable": "red"}


def literal(value: Any, style: str = "") -> Text:
    """Host-supplied text, shown as it is (no markup, no control characters)."""
    return Text(clean_text(value), style=style)


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def warn(lines: Sequence[str]) -> None:
    """Problems that did not stop the command (a torn metrics line): one yellow line each."""
    for line in lines:
        err.print(f"[yellow]warning:[/] {escape(clean_text(line))}", soft_wrap=True)


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def recap_table(results: Sequence[HostResult], title: str) -> Table:
    table = Table(title=title)
    for column in ("host", "status", "changed", "detail"):
        table.add_column(column)
    for result in results:
        style = STATUS_STYLE.get(result.status, "")
        detail = result.error or ", ".join(
            f"{s.name} ({s.detail})" if s.detail else s.name for s in result.steps if s.changed
        ) or "nothing to do"
        table.add_row(literal(result.host), literal(result.status, style), str(result.changed),
                      literal(detail))
    return table


# A round's table row names at most this many dropped hosts with their reasons.
DROPPED_LISTED = 5


def round_table(privacy: bool = False) -> Table:
    """The per-round table; an epsilon column only for runs with differential privacy."""
    table = Table(title="federated rounds")
    for column, justify in (("round", "right"), ("hosts", "right"), ("train loss", "right"),
                            ("eval loss", "right"), ("accuracy", "right"),
                            *((("epsilon", "right"),) if privacy else ()),
                            ("seconds", "right"), ("bytes", "right"), ("dropped", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    return table


def add_round_row(table: Table, record: RoundRecord) -> None:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lost = sorted(record.dropped.items())
    dropped = "; ".join(f"{k}: {v}" for k, v in lost[:DROPPED_LISTED])
    if len(lost) > DROPPED_LISTED:
        dropped += (f"; and {len(lost) - DROPPED_LISTED} more (`flctl runs show RUN --host H` "
                    f"or --json)")
    table.add_row(
        str(record.round),
        str(len(record.participants)),
        num(record.train_loss, ".4f"),
        num(record.eval_loss, ".4f"),
        "-" if record.accuracy is None else f"{100 * record.accuracy:.2f}%",
        *((num(record.epsilon, ".3g"),) if any(c.header == "epsilon" for c in table.columns)
          else ()),
        f"{record.seconds:.2f}" + (f" ({record.attempts} tries)" if record.attempts > 1 else ""),
        human_bytes(record.bytes_sent + record.bytes_received),
        literal(dropped),
    )


def host_history_table(host: str, rows: Sequence[dict[str, Any]]) -> Table:
    """`flctl runs show RUN --host H`: one host, a row per round."""
    table = Table(title=f"host {literal(host).plain}")
    for column, justify in (("round", "right"), ("status", "left"), ("train loss", "right"),
                            ("examples", "right"), ("fit s", "right"), ("bytes", "right"),
                            ("reason", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    colours = {"answered": "green", "straggled": "yellow", "dropped": "red"}
    for row in rows:
        loss, fit_s = row.get("train_loss"), row.get("fit_s")
        moved = (row["bytes_sent"] + row["bytes_received"]) if "bytes_sent" in row and (
            "bytes_received" in row) else None
        table.add_row(
            str(row["round"]), literal(row["status"], colours.get(row["status"], "dim")),
            "-" if loss is None else f"{loss:.4f}",
            "-" if row.get("examples") is None else str(row["examples"]),
            "-" if fit_s is None else f"{fit_s:.2f}",
            "-" if moved is None else human_bytes(moved),
            literal(row.get("reason", "")))
    return table


# `flctl status` gives at most this many hosts a row each; a larger
# federation gets a summary (--all or --json for every host).
HOSTS_LISTED = 40


def names_line(names: Sequence[str], limit: int = 10) -> str:
    """Host names for one line: the first `limit`, then how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def needs_attention(row: dict[str, Any]) -> bool:
    """A status row worth a line of its own: its agent does not serve, its
    tunnel is down, or there is a note (an error, a restart)."""
    return (row.get("agent") not in ("idle", "training") or row.get("tunnel") == "down"
            or bool(row.get("error") or row.get("data_error") or row.get("frozen_error")
                    or row.get("last_exit")))


def hosts_by_agent_state(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Host names per agent state (the host's text cleaned), most common state first."""
    by_state: dict[str, list[str]] = {}
    for row in rows:
        by_state.setdefault(clean_text(str(row.get("agent", "down")))[:40], []).append(
            row["host"])
    return dict(sorted(by_state.items(), key=lambda item: -len(item[1])))


def status_overview(rows: Sequence[dict[str, Any]]) -> Table:
    """`flctl status` over many hosts: how many are in each agent state."""
    table = Table(title=f"{len(rows)} hosts")
    table.add_column("agent")
    table.add_column("hosts", justify="right")
    table.add_column("of them", justify="left")
    for state, names in hosts_by_agent_state(rows).items():
        table.add_row(agent_cell({"agent": state}), str(len(names)),
                      literal(names_line(names, 5)))
    return table


def status_table(rows: Sequence[dict[str, Any]], title: str = "hosts") -> Table:
    """The at-a-glance view; everything else is in `--json`."""
    table = Table(title=title)
    tunnels = any("tunnel" in row for row in rows)
    frameworks = any((row.get("environment") or {}).get("torch") for row in rows)
    parts = Counter(row.get("frozen") for row in rows if row.get("frozen"))
    for column in ("host", "agent", *(("tunnel",) if tunnels else ()),
                   *(("torch",) if frameworks else ()), *(("frozen",) if parts else ()),
                   "uptime", "data", "round",
                   "load", "mem free", "disk free", "note"):
        table.add_column(column)
    for row in rows:
        load = row.get("load")
        data = "-" if row.get("n_train") is None else f"{row['n_train']}+{row.get('n_test') or 0}"
        uptime = row.get("agent_uptime_s")
        tunnel: tuple[Any, ...] = ()
        if tunnels:
            tunnel = (tunnel_cell(row),)
        if frameworks:
            tunnel = (*tunnel, literal(_torch_cell(row.get("environment") or {})))
        if parts:   # the frozen part's digest; red where it is not what most have
            sha = row.get("frozen")
            agrees = sha is not None and sha == parts.most_common(1)[0][0]
            tunnel = (*tunnel, literal(str(sha)[:12] if sha else "-",
                                       "green" if agrees else "red"))
        table.add_row(
            literal(row["host"]), agent_cell(row), *tunnel,
            "-" if uptime is None else f"{uptime:.0f}s",
            data,
            "-" if row.get("last_round") is None else str(row["last_round"]),
            "-" if not load else f"{load[0]:.2f}",
            human_bytes(row.get("mem_available_bytes")),
            human_bytes(row.get("disk_free_bytes")),
            literal(row.get("error") or row.get("data_error") or row.get("frozen_error")
                    or (f"restarted: {row['last_exit']}" if row.get("last_exit") else "")),
        )
    return table


def _torch_cell(environment: dict[str, Any]) -> str:
    """torch's version and where the agent trains: "2.3.1, CUDA 12.1, GPU 0,1" or "..., CPU"."""
    if not environment.get("torch"):
        return "-"
    if environment.get("device") == "cuda" and environment.get("gpus"):
        visible = environment.get("cuda_visible_devices")
        which = f"GPU {visible}" if visible else f"{environment['gpus']} GPUs"
        return f"{environment['torch']}, CUDA {environment.get('cuda')}, {which}"
    return f"{environment['torch']}, CPU"


def agent_cell(row: dict[str, Any]) -> Text:
    """A status row's agent state: green when it serves (idle or training), else red."""
    agent = row.get("agent", "down")
    return literal(agent, "green" if agent in ("idle", "training") else "red")


def tunnel_cell(row: dict[str, Any]) -> Text:
    state = row.get("tunnel")
    if state is None:
        return Text("-")
    age = row.get("handshake_age_s")
    colour = "green" if state == "up" else "red" if state == "down" else "yellow"
    detail = "never" if age is None and state != "unknown" else ("" if age is None else f"{age}s ago")
    moved = human_bytes((row.get("tunnel_rx_bytes") or 0) + (row.get("tunnel_tx_bytes") or 0))
    cell = literal(state, colour)
    cell.append(f" {detail} {moved if state != 'unknown' else ''}".rstrip())
    return cell


def runs_table(infos: Sequence[RunInfo]) -> Table:
    table = Table(title="runs")
    for column in ("run", "state", "rounds", "accuracy", "epsilon", "hosts"):
        table.add_column(column)
    for info in infos:
        table.add_row(*run_cells(info), str(len(info.hosts)))
    return table


def run_cells(info: RunInfo) -> list[str]:
    colour = {"finished": "green", "interrupted": "yellow", "running": "cyan"}.get(info.state,
                                                                                 "dim")
    planned = "?" if info.rounds_planned is None else str(info.rounds_planned)
    return [info.run_id, f"[{colour}]{info.state}[/]", f"{info.rounds_done}/{planned}",
            "-" if info.accuracy is None else f"{100 * info.accuracy:.2f}%",
            "-" if info.epsilon is None else f"{info.epsilon:.3g}"]


def latest_run_line(info: RunInfo) -> str:
    run, state, rounds, accuracy, epsilon = run_cells(info)
    privacy = "" if info.epsilon is None else (
        f", privacy spent epsilon {epsilon} at delta {info.delta:g}")
    return f"latest run {run}: {state}, round {rounds}, accuracy {accuracy}{privacy}"


def certificates_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="certificates issued by the project CA")
    for column in ("name", "role", "serial", "days left", "state"):
        table.add_column(column)
    for row in rows:
        days = row.get("days_left")
        revoked = row.get("revoked_at")
        state = Text(f"revoked ({row.get('revocation_reason') or 'no reason'})", "red") \
            if revoked else (Text("expiring", "yellow") if days is not None and days < 30
                             else Text("valid", "green"))
        table.add_row(Text(str(row.get("cn"))), Text(str(row.get("role") or "-")),
                      Text(str(row.get("serial"))[:16]), "-" if days is None else str(days), state)
    return table


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def feature_table(stats: FederatedStats) -> Table:
    """One row per feature: what `flctl stats` found."""
    document = stats.as_dict()
    table = Table(title=f"features over {len(stats.hosts)} hosts, {stats.rows} rows")
    for column in ("feature", "count", "missing", "mean", "std", "min", "p5", "median",
                   "p95", "max"):
        table.add_column(column, justify="left" if column == "feature" else "right")
    for row in document["features"]:
        q = row.get("quantiles") or {}
        table.add_row(literal(row["name"]), str(row["count"]), str(row["missing"]),
                      _num(row["mean"]), _num(row["std"]), _num(row["min"]),
                      _num(q.get("0.05")), _num(q.get("0.5")), _num(q.get("0.95")),
                      _num(row["max"]))
    return table


def label_table(stats: FederatedStats) -> Table:
    """Rows per label on each host, and each host's label skew (0 = the mix)."""
    totals = stats.label_totals()
    table = Table(title="labels per host (skew: 0 = the federation's mix, 1 = disjoint)")
    table.add_column("host")
    for label in totals:
        table.add_column(str(label), justify="right")
    table.add_column("skew", justify="right")
    if stats.secure:   # the federation's counts only (securestats.py)
        table.add_row(literal(f"all {len(stats.hosts)} hosts"),
                      *(str(n) for n in totals.values()), "-")
        return table
    skew = stats.skew()
    for host in stats.hosts:
        counts = stats.labels.get(host, {})
        table.add_row(literal(host), *(str(counts.get(k, 0)) for k in totals),
                      f"{skew.get(host, 0.0):.2f}")
    for host in stats.withheld:
        table.add_row(literal(host), *("-" for _ in totals), literal("withheld", "yellow"))
    return table
