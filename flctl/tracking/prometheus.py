"""`flctl train --metrics-port`: the run's live numbers in Prometheus text
format, served with prometheus_client from a registry of its own (never the
process-wide one), on 127.0.0.1 unless told otherwise; shut down at the end.

Updated in the round callback itself (setting a few gauges costs
microseconds), so a scrape always shows the round just done.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flctl.errors import ConfigError
from flctl.tracking.base import host_counts, require


class PrometheusExporter:
    name = "prometheus"

    def __init__(self, port: int, address: str = "127.0.0.1") -> None:
        client = require("prometheus_client", "prometheus", "--metrics-port")
        self.registry = registry = client.CollectorRegistry(auto_describe=True)
        self.info = client.Info("flctl_run", "The run being trained", registry=registry)
        self.rounds_done = client.Gauge("flctl_rounds_done", "Rounds completed",
                                        registry=registry)
        self.rounds_planned = client.Gauge("flctl_rounds_planned", "Rounds planned",
                                           registry=registry)
        self.hosts_answering = client.Gauge(
            "flctl_hosts_answering", "Hosts whose update the last round took", registry=registry)
        self.last_accuracy = client.Gauge(
            "flctl_last_accuracy", "Federated accuracy of the last evaluated round",
            registry=registry)
        self.round_seconds = client.Gauge("flctl_round_seconds", "Wall time of the last round",
                                          registry=registry)
        self.bytes_sent = client.Counter(
            "flctl_bytes_sent", "Bytes sent by the coordinator to hosts", registry=registry)
        self.bytes_received = client.Counter(
            "flctl_bytes_received", "Bytes received by the coordinator from hosts",
            registry=registry)
        self.host_last_seen = client.Gauge(
            "flctl_host_last_seen_timestamp_seconds",
            "When the host last answered a round (Unix time)", ["host"], registry=registry)
        self.host_fit_seconds = client.Gauge(
            "flctl_host_fit_seconds", "The host's compute seconds in its last answered round",
            ["host"], registry=registry)
        try:
            self.server, self.thread = client.start_http_server(port, addr=address,
                                                                registry=registry)
        except OSError as exc:
            why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ConfigError(f"cannot serve metrics on {address}:{port}: {why}",
                              field="--metrics-port") from None
        self.address = f"{address}:{self.server.server_port}"

    def start(self, run_id: str, settings: Mapping[str, Any],
              saved: Mapping[str, Any] | None) -> dict[str, Any]:
        self.info.info({"run_id": run_id})
        if isinstance(settings.get("rounds"), int):
            self.rounds_planned.set(settings["rounds"])
        return {}

    def round(self, record: Mapping[str, Any]) -> None:
        now = time.time()
        self.rounds_done.set(int(record["round"]))
        self.hosts_answering.set(host_counts(record)["answered"])
        if record.get("accuracy") is not None:
            self.last_accuracy.set(float(record["accuracy"]))
        self.round_seconds.set(float(record.get("seconds") or 0.0))
        self.bytes_sent.inc(max(0, int(record.get("bytes_sent") or 0)))
        self.bytes_received.inc(max(0, int(record.get("bytes_received") or 0)))
        hosts = record.get("hosts")
        if isinstance(hosts, Mapping):
            for name, entry in hosts.items():
                if not isinstance(entry, Mapping) or entry.get("status") != "answered":
                    continue
                self.host_last_seen.labels(host=name).set(now)
                if isinstance(entry.get("fit_s"), (int, float)):
                    self.host_fit_seconds.labels(host=name).set(float(entry["fit_s"]))
        else:  # a record from before per-host entries
            for name in record.get("participants") or ():
                self.host_last_seen.labels(host=name).set(now)

    def finish(self, final_path: Path, manifest: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)
