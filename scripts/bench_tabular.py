#!/usr/bin/env python3
"""Learning quality on real tabular data: default `flctl train` against a
centralised, standardised logistic regression.

Data sets that ship with scikit-learn, with features on very different
scales: breast cancer (30 features, 'mean area' in the thousands beside
'mean smoothness' near 0.1) and wine (13 features, 'proline' up to 1680
beside 'hue' near 1). Each is split 80/20 (stratified), the training part
over 4 and over 8 deployed local agents with Dirichlet(0.5) label skew,
3 splits each. flctl trains with its defaults (logreg, standardize: auto,
the default learning rate) for 30 rounds and is scored at the coordinator
on the test part through training.eval_file, with the run's stored
transform applied; the reference is scikit-learn's StandardScaler +
LogisticRegression on the same split. Target: within 3 points, averaged
over the splits. Needs scikit-learn (`pip install scikit-learn`); only
loopback traffic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
from bench_round_overhead import local_federation  # noqa: E402  (the script's own folder)
from verdict import Target, exit_status  # noqa: E402

from flctl.coordinator.records import create_run_dir
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.session import endpoints_for, workspace_context
from flctl.core.data import Dataset, dirichlet_split, save_dataset, stratified_split
from flctl.net.agent_client import AgentClient
from flctl.workspace import load_workspace

ROUNDS = 30
SPLITS = 3
TOLERANCE = 3.0   # points


def datasets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_breast_cancer, load_wine
    return {name: (loader().data.astype(np.float32), loader().target.astype(np.int64))
            for name, loader in (("breast_cancer", load_breast_cancer), ("wine", load_wine))}


def central(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
            y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(x_train, y_train)
    return float(model.score(x_test, y_test))


def federated(hosts: int, x: np.ndarray, y: np.ndarray, test: Dataset, seed: int,
              standardize: str = "auto") -> dict[str, Any]:
    parts = dirichlet_split(y, hosts, 0.5, seed, min_size=10)
    shards = [Dataset(x[idx], y[idx]) for idx in parts]
    with local_federation(hosts, None, "logreg", data=shards) as root:
        save_dataset(test, root / "test.npz")
        workspace = load_workspace(root)
        training = workspace.settings.with_training(
            task="logreg", rounds=ROUNDS, seed=seed, eval_file="test.npz",
            standardize=standardize,
            task_params={"n_features": int(x.shape[1]),
                         "n_classes": int(y.max()) + 1}).training
        clients = [AgentClient(e, workspace_context(workspace), timeout=300)
                   for e in endpoints_for(workspace, workspace.inventory.hosts)]
        told: list[str] = []
        records: list[Any] = []
        from flctl.core.data import load_dataset
        started = time.perf_counter()
        Coordinator(clients, training, create_run_dir(workspace.paths.runs),
                    tasks_dir=workspace.paths.tasks, on_round=records.append,
                    on_message=told.append, eval_data=load_dataset(root / "test.npz"),
                    ca_pem=workspace.paths.ca_cert.read_bytes()).train()
        wall = time.perf_counter() - started
    return {"accuracy": records[-1].central_accuracy, "told": told, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--splits", type=int, default=SPLITS)
    parser.add_argument("--standardize", default="auto", choices=["auto", "on", "off"],
                        help="flctl's setting (off: what flctl did before it had one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    targets: list[Target] = []
    lines: list[str] = []
    for name, (x, y) in datasets().items():
        for hosts in args.hosts:
            rows = []
            for seed in range(args.splits):
                train_idx, test_idx = stratified_split(y, 0.2, seed)
                reference = central(x[train_idx], y[train_idx], x[test_idx], y[test_idx])
                run = federated(hosts, x[train_idx], y[train_idx],
                                Dataset(x[test_idx], y[test_idx]), seed, args.standardize)
                rows.append({"seed": seed, "central": reference, **run})
            flctl_mean = statistics.mean(r["accuracy"] for r in rows)
            central_mean = statistics.mean(r["central"] for r in rows)
            report[f"{name}/{hosts}"] = rows
            lines.append(f"{name}, {hosts} hosts, Dirichlet(0.5), {args.splits} splits, "
                         f"standardize {args.standardize}: flctl "
                         f"{100 * flctl_mean:.1f}% against central standardised logistic "
                         f"regression {100 * central_mean:.1f}% (per split: "
                         + ", ".join(f"{100 * r['accuracy']:.1f}/{100 * r['central']:.1f}"
                                     for r in rows) + ")")
            targets.append(Target(f"{name} on {hosts} hosts: central - flctl",
                                  100 * (central_mean - flctl_mean), "<=", TOLERANCE,
                                  " points"))
    report["targets"] = [t.as_json() for t in targets]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print("\n".join(lines))
        for target in targets:
            print(f"  {target.line()}")
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
