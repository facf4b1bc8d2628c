"""The stderr views' text: how far a model transfer or a deploy has gone."""

from __future__ import annotations

import io

from rich.console import Console

from flctl.cli import render
from flctl.cli.progress import SHOW_TRANSFERS_FROM, HostProgress, TrainView
from flctl.coordinator.progress import TransferProgress


class Client:
    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes_out_now = 1000   # what earlier rounds sent


def text_of(renderable: object) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_the_train_view_shows_a_large_model_on_its_way_and_nothing_for_a_small_one() -> None:
    transfers = TransferProgress()
    view = TrainView(render.round_table(), transfers)
    clients = [Client("a"), Client("b"), Client("c")]
    each = SHOW_TRANSFERS_FROM
    transfers.begin("round 2: model to hosts", clients, each)
    clients[0].bytes_out_now += each + 50         # whole model plus frame heads
    clients[1].bytes_out_now += each // 2
    shown = text_of(view)
    assert "round 2: model to hosts: 12.6 MB of 25.2 MB (1 of 3 hosts have it)" in shown
    transfers.end()
    assert "model to hosts" not in text_of(view)
    transfers.begin("round 3: model to hosts", clients, 1000)   # a small model: no line
    assert "model to hosts" not in text_of(view)


def test_the_deploy_view_counts_hosts_done_but_not_the_hub() -> None:
    view = HostProgress(["a", "b", "c"], "deploy", enabled=False)
    view.update("a", "uploading 3 wheels: 1.0 of 4.0 MB")
    view.update("b", "done (changed)")
    view.update("hub", "bringing up the hub interface")
    assert "deploy: 1 of 3 hosts done" in text_of(view._render())
    view.update("a", "done (ok)")
    view.update("hub", "done (changed)")
    assert "deploy: 2 of 3 hosts done" in text_of(view._render())


def test_a_deploy_to_many_hosts_shows_the_hosts_under_way_and_counts_the_rest() -> None:
    """A frame stays small (it is drawn several times a second): past MAX_ROWS
    hosts, the waiting and finished ones are counted, not listed."""
    hosts = [f"lab{i}" for i in range(1, 49)]
    view = HostProgress(hosts, "deploy", enabled=False)
    for host in hosts[:10]:
        view.update(host, "done (ok)")
    for host in hosts[10:13]:
        view.update(host, "gathering facts")
    view.update("hub", "bringing up the hub interface")
    text = text_of(view._render())
    assert "deploy: 10 of 48 hosts done" in text
    assert "lab11" in text and "lab13" in text and "bringing up the hub interface" in text
    assert "lab1 " not in text and "lab14" not in text
    assert "and 45 more (35 waiting, 10 done)" in text
    assert len(text.strip().splitlines()) == 1 + 4 + 1
    for host in hosts:
        view.update(host, "checking the host")
    shown = text_of(view._render()).strip().splitlines()
    assert len(shown) == 1 + HostProgress.MAX_ROWS + 1 and "(0 waiting, 0 done)" in shown[-1]
    few = HostProgress(["a", "b"], "deploy", enabled=False)
    assert "waiting" in text_of(few._render())   # few hosts: every one listed, as before
