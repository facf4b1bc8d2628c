"""`flctl train --detach`: a run that outlives the terminal that started it,
listed as running, followed with `runs attach`, ended with `runs stop` after
a round (and resumed exactly), restarted by its supervisor after a crash.
Real processes against local agents; rounds are slowed (scripts/slow_task.py)
so that there is a run to watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.control import ProcessRecord, this_process, write_process
from flctl.coordinator.metrics_tail import MetricsTail
from flctl.coordinator.records import RunDir, load_weights
from flctl.core.run_unit import RunUnitSpec, render_run_unit, run_unit_name, systemd_quote
from flctl.service.liveness import coordinator, is_running, supervisor
from flctl.service.supervisor import crashed

from helpers import deployed_local_workspace, flctl_command, run_cli, set_training

SLOW_TASK = Path(__file__).resolve().parents[1] / "scripts" / "slow_task.py"
DELAY_S = 0.3     # per fit: a round takes about this long
ROUNDS = 14
ARGS = ("--rounds", str(ROUNDS), "--seed", "9")


def slow(root: Path) -> None:
    (root / "tasks" / "slow.py").write_text(SLOW_TASK.read_text())
    set_training(root, task="slow:Slow", task_params={"delay": DELAY_S}, deadline_s=30.0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("detach"), 2, slow)


@pytest.fixture(scope="module")
def whole(workspace: Path) -> Path:
    """The same run, uninterrupted, in the foreground: what every other must equal."""
    done = run_cli("train", "-w", str(workspace), *ARGS, "--run-id", "whole", "--json",
                   timeout=300)
    assert done.returncode == 0, done.stderr
    return workspace / "runs" / "whole"


def rounds_on_disk(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def checkpointed(run: Path) -> int:
    """The last checkpointed round (a round's metrics line is written before
    its checkpoint, so metrics.jsonl may be one round ahead)."""
    try:
        return int(json.loads((run / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def listed(workspace: Path) -> dict[str, dict]:
    done = run_cli("runs", "-w", str(workspace), "--json")
    assert done.returncode == 0, done.stderr
    return {r["run_id"]: r for r in done.json()["runs"]}


def detach(workspace: Path, run_id: str, *extra: str) -> dict:
    started = time.monotonic()
    done = run_cli("train", "-w", str(workspace), *ARGS, "--run-id", run_id, "--detach",
                   "--json", *extra)
    assert done.returncode == 0, done.stderr
    document = done.json()
    document["took"] = time.monotonic() - started
    return document


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_weights(a / "final.npz"), load_weights(b / "final.npz")
    return len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))


def test_a_detached_run_outlives_its_terminal(workspace: Path, whole: Path) -> None:
    """Started from a shell in a session of its own (a terminal), whose whole
    process group then gets SIGHUP and SIGKILL: the run goes on, is listed
    as running, holds the workspace lock itself, and finishes exactly."""
    out = workspace / "terminal.out"
    shell = subprocess.Popen(
        ["sh", "-c", '"$@" > "$0" 2>&1; echo done >> "$0.rc"; exec sleep 300', str(out),
         *flctl_command(), "train", "-w", str(workspace), *ARGS, "--run-id", "orphan",
         "--detach", "--json"],
        start_new_session=True, stdin=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        wait_for(lambda: Path(f"{out}.rc").exists(), "train --detach to return", 60)
        took = time.monotonic() - started
        document = json.loads(out.read_text())
        run = workspace / "runs" / "orphan"
        assert document["run"] == "orphan" and document["log"] == str(run / "detach.log")
        assert len(rounds_on_disk(run)) < ROUNDS, "the run was over before detach returned"
        assert took < 30, took
        os.killpg(shell.pid, signal.SIGHUP)
        os.killpg(shell.pid, signal.SIGKILL)
    finally:
        shell.wait()
    assert listed(workspace)["orphan"]["state"] == "running"
    status = run_cli("status", "-w", str(workspace), "--json")
    if is_running(RunDir(run)):   # it ran all along: status must have said so
        assert status.json()["latest_run"]["state"] == "running", status.stdout
    pid = coordinator(RunDir(run)).pid
    holder = json.loads((workspace / ".flctl" / "lock").read_text())
    assert holder["pid"] == pid and holder["command"] == "flctl train"
    assert supervisor(RunDir(run)).pid == document["pid"] != pid
    assert os.getsid(document["pid"]) == document["pid"]   # a session of its own
    wait_for(lambda: not is_running(RunDir(run)), "the run to end")
    row = listed(workspace)["orphan"]
    assert row["state"] == "finished" and row["rounds_done"] == ROUNDS
    assert same_weights(run, whole)
    assert not (run / "process.json").exists() and not (run / "supervisor.json").exists()


def test_stop_ends_the_run_after_its_round_and_resume_continues_exactly(
        workspace: Path, whole: Path) -> None:
    document = detach(workspace, "stopped")
    run = workspace / "runs" / "stopped"
    wait_for(lambda: len(rounds_on_disk(run)) >= 3, "three rounds")
    started = time.monotonic()
    stop = run_cli("runs", "stop", "stopped", "-w", str(workspace), "--json")
    took = time.monotonic() - started
    assert stop.returncode == 0, stop.stderr
    stopped = stop.json()
    assert stopped["state"] == "interrupted"
    # within one round: the round under way when it was asked is the last
    asked = stopped["asked_after_round"]
    assert 3 <= asked <= stopped["rounds_done"] <= asked + 1 < ROUNDS
    assert rounds_on_disk(run) == list(range(1, stopped["rounds_done"] + 1))
    assert json.loads((run / "state.json").read_text())["round"] == stopped["rounds_done"]
    seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text()
               .splitlines()]
    round_s = max(seconds)
    print(f"\ndetach returned in {document['took']:.2f}s; runs stop took {took:.2f}s in all, "
          f"{stopped['seconds']:.2f}s from its request to the run's end; one round "
          f"{round_s:.2f}s ({stopped['seconds'] / round_s:.1f} rounds)")
    assert took < 30 * round_s + 10   # wide: a round, the exit, a loaded machine
    assert listed(workspace)["stopped"]["state"] == "interrupted"

    again = run_cli("runs", "stop", "stopped", "-w", str(workspace))
    assert again.returncode == 3 and "not running" in again.stderr
    assert "--resume stopped" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    resumed = run_cli("train", "--resume", "stopped", "-w", str(workspace), "--json",
                      timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["rounds"] == ROUNDS
    assert rounds_on_disk(run) == list(range(1, ROUNDS + 1))
    assert same_weights(run, whole)
    assert not (run / "stop.request").exists()


def test_stop_ends_a_run_in_another_terminal_too(workspace: Path) -> None:
    run = workspace / "runs" / "foreground"
    train = subprocess.Popen(
        [*flctl_command(), "train", "-w", str(workspace), *ARGS, "--run-id", "foreground"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True)
    wait_for(lambda: len(rounds_on_disk(run)) >= 2, "two rounds")
    assert listed(workspace)["foreground"]["state"] == "running"
    stop = run_cli("runs", "stop", "foreground", "-w", str(workspace))
    assert stop.returncode == 0, stop.stderr
    assert "continue it with `flctl train --resume foreground`" in stop.stdout
    _, err = train.communicate(timeout=60)
    assert train.returncode == 6
    assert "stopped after round" in err and "as asked (`flctl runs stop`)" in err
    assert listed(workspace)["foreground"]["state"] == "interrupted"


def test_attach_follows_the_rounds_until_the_run_ends(workspace: Path) -> None:
    detach(workspace, "followed", "--rounds", "8")
    attach = run_cli("runs", "attach", "followed", "-w", str(workspace), timeout=120)
    assert attach.returncode == 0, attach.stderr
    lines = attach.stdout.splitlines()
    shown = [int(line.split(":")[0].split()[1]) for line in lines if line.startswith("round ")]
    assert shown == list(range(1, 9)), attach.stdout
    assert "run followed finished: 8 rounds on 2 hosts" in attach.stdout
    assert not is_running(RunDir(workspace / "runs" / "followed"))

    summary = run_cli("runs", "attach", "followed", "-w", str(workspace))
    assert summary.returncode == 0, summary.stderr
    assert "finished" in summary.stdout and "8/8" in summary.stdout


def test_ctrl_c_detaches_from_attach_and_leaves_the_run_going(workspace: Path) -> None:
    detach(workspace, "left", "--rounds", "10")
    run = workspace / "runs" / "left"
    attach = subprocess.Popen(
        [*flctl_command(), "runs", "attach", "left", "-w", str(workspace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        # a background job (CI) ignores SIGINT, and so would attach
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "attached to run left" in attach.stderr.readline()
    wait_for(lambda: len(rounds_on_disk(run)) >= 2, "two rounds")
    time.sleep(0.5)
    attach.send_signal(signal.SIGINT)
    out, err = attach.communicate(timeout=30)
    assert (attach.returncode, err) == (0, "detached from run left; it goes on "
                                           "(`flctl runs attach left`)\n")
    assert "round 1:" in out
    assert is_running(RunDir(run))
    wait_for(lambda: not is_running(RunDir(run)), "the run to end")
    assert listed(workspace)["left"]["state"] == "finished"


def test_the_supervisor_resumes_a_coordinator_killed_with_9(workspace: Path,
                                                             whole: Path) -> None:
    detach(workspace, "crashed")
    run = workspace / "runs" / "crashed"
    wait_for(lambda: len(rounds_on_disk(run)) >= 3, "three rounds")
    os.kill(coordinator(RunDir(run)).pid, signal.SIGKILL)
    wait_for(lambda: not is_running(RunDir(run)), "the run to end")
    assert listed(workspace)["crashed"]["state"] == "finished"
    assert same_weights(run, whole)
    log = (run / "detach.log").read_text()
    assert "was killed by SIGKILL" in log and "restarting it in" in log
    assert "train --resume" in log


def test_sigterm_to_the_supervisor_interrupts_the_run_resumably(workspace: Path) -> None:
    """What `systemctl --user stop` or a shutdown does: the coordinator gets
    SIGINT (even where the job that started it ignores SIGINT, as CI's do),
    ends interrupted with its checkpoint, and is not restarted."""
    document = detach(workspace, "terminated", "--rounds", "200")
    run = workspace / "runs" / "terminated"
    wait_for(lambda: checkpointed(run) >= 2, "two rounds checkpointed")
    os.kill(document["pid"], signal.SIGTERM)
    wait_for(lambda: not is_running(RunDir(run)), "the run to end", 60)
    row = listed(workspace)["terminated"]
    assert row["state"] == "interrupted" and row["rounds_done"] >= 2
    log = (run / "detach.log").read_text()
    assert "the coordinator exited with code 130" in log and "restarting" not in log


def test_bad_input_gets_one_line(workspace: Path) -> None:
    for command in ("stop", "attach"):
        unknown = run_cli("runs", command, "no-such-run", "-w", str(workspace))
        assert unknown.returncode == 3 and "no run 'no-such-run'" in unknown.stderr
        assert "Traceback" not in unknown.stderr
    assert run_cli("train", "-w", str(workspace), "--rounds", "1", "--run-id", "done",
                   "--json").returncode == 0
    finished = run_cli("runs", "stop", "done", "-w", str(workspace))
    assert finished.returncode == 3
    assert finished.stderr.strip() == ("error: run done is not running (it finished after 1 "
                                       "rounds)")
    reused = run_cli("train", "-w", str(workspace), "--run-id", "done", "--detach")
    assert reused.returncode == 6 and "run done already exists" in reused.stderr

    wrong = run_cli("train", "-w", str(workspace), "--detach", "--strategy", "nosuch",
                    "--run-id", "wrong")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1
    assert "run wrong did not start: unknown strategy 'nosuch'" in wrong.stderr
    assert "wrong/detach.log" in wrong.stderr
    assert not is_running(RunDir(workspace / "runs" / "wrong"))
    attached = run_cli("runs", "attach", "wrong", "-w", str(workspace))
    assert attached.returncode == 3
    assert "ended before its first round: unknown strategy 'nosuch'" in attached.stderr

    detach(workspace, "busy-one", "--rounds", "500")
    try:
        busy = run_cli("train", "-w", str(workspace), "--detach", "--run-id", "busy-two")
        assert busy.returncode == 3 and "workspace busy" in busy.stderr
        assert not (workspace / "runs" / "busy-two").exists()
        stray = run_cli("train", "-w", str(workspace), "--resume", "--detach", "--lr", "0.1")
        assert stray.returncode == 2 and "only --rounds" in stray.stderr
    finally:
        assert run_cli("runs", "stop", "busy-one", "-w", str(workspace)).returncode == 0


def test_a_stale_pidfile_is_not_a_running_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        write_process(run.path / "process.json", ProcessRecord(sleeper.pid, None))
        assert not is_running(run)               # alive, but not flctl
        me = this_process()
        write_process(run.path / "process.json",
                      ProcessRecord(me.pid, (me.start_ticks or 0) + 1))
        assert not is_running(run)               # the pid, but a later process
    finally:
        sleeper.kill()
        sleeper.wait()
    write_process(run.path / "process.json", ProcessRecord(sleeper.pid, None))
    assert not is_running(run)                   # gone
    (run.path / "process.json").write_text('{"pid": "1; rm -rf /"}')
    assert not is_running(run)


def test_what_counts_as_a_crash() -> None:
    assert crashed(-signal.SIGKILL) and crashed(-signal.SIGSEGV)
    assert not any(crashed(code) for code in (0, 1, 2, 3, 5, 6, 130, -signal.SIGTERM,
                                              -signal.SIGINT))


def test_the_tail_gives_whole_new_rounds_only(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    tail = MetricsTail(run)
    assert tail.new_records() == []
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2')
    assert [r["round"] for r in tail.new_records()] == [1]
    with path.open("a") as handle:
        handle.write('}\nnot json\n{"round": 3}\n')
    assert [r["round"] for r in tail.new_records()] == [2, 3]
    path.write_text('{"round": 1}\n{"round": 2}\n')   # a resume rewrote it
    assert tail.new_records() == []
    with path.open("a") as handle:
        handle.write('{"round": 3}\n{"round": 4}\n')
    assert [r["round"] for r in tail.new_records()] == [4]


def test_the_systemd_user_unit_text() -> None:
    spec = RunUnitSpec("20260101-000000-ab12", "/home/op/ws 1",
                       ["/usr/bin/python3", "-m", "flctl.service.supervisor",
                        "/home/op/ws 1/runs/20260101-000000-ab12"],
                       "/home/op/ws 1/runs/20260101-000000-ab12/detach.log",
                       {"PYTHONPATH": "/opt/50%$off"})
    text = render_run_unit(spec)
    lines = text.splitlines()
    assert "[Service]" in lines and "Restart=no" in lines and "StandardInput=null" in lines
    assert ('ExecStart="/usr/bin/python3" "-m" "flctl.service.supervisor" '
            '"/home/op/ws 1/runs/20260101-000000-ab12"') in lines
    assert "WorkingDirectory=/home/op/ws 1" in lines
    assert "StandardOutput=append:/home/op/ws 1/runs/20260101-000000-ab12/detach.log" in lines
    assert 'Environment="PYTHONPATH=/opt/50%%$$off"' in lines
    assert "KillMode=mixed" in lines
    assert run_unit_name("20260101-000000-ab12") == "flctl-run-20260101-000000-ab12.service"
    assert systemd_quote('a"b\\c') == '"a\\"b\\\\c"'
    for bad in ("../x", "a b", ""):
        with pytest.raises(ValueError):
            run_unit_name(bad)
    with pytest.raises(ValueError):
        render_run_unit(RunUnitSpec("x", "/ws", ["a\nb"], "/ws/log"))
    with pytest.raises(ValueError):
        render_run_unit(RunUnitSpec("x", "relative", ["a"], "/ws/log"))


def test_the_background_command_has_the_flags_given(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flctl.cli import app as cli
    from flctl.cli.detach import detached_spec
    from flctl.workspace import init_workspace

    root = tmp_path / "ws"
    init_workspace(root, local_hosts=2)
    specs = []
    monkeypatch.setattr(cli, "start_detached", lambda ctx, workspace, **_: specs.append(
        detached_spec(ctx, workspace.root.resolve(), "R1", ctx.params["resume"])))
    given = ["--rounds", "3", "--lr", "0.05", "--no-secure-aggregation", "-l", "a",
             "--limit", "b", "--metrics-port", "9100", "--fraction", "0.1"]
    done = CliRunner().invoke(cli.app, ["train", "-w", str(root), "--detach", "--json",
                                        *given])
    assert done.exit_code == 0, done.output
    ws = ["--workspace", str(root.resolve())]
    assert specs[0].start == ["train", *ws, "--limit", "a", "--limit", "b", "--rounds", "3",
                              "--lr", "0.05", "--fraction", "0.1", "--no-secure-aggregation",
                              "--run-id", "R1", "--metrics-port", "9100"]
    assert specs[0].resume == ["train", "--resume", *ws, "--rounds", "3", "--metrics-port",
                               "9100", "R1"]
    done = CliRunner().invoke(cli.app, ["train", "--resume", "R1", "-w", str(root),
                                        "--detach", "--rounds", "9"])
    assert done.exit_code == 0, done.output
    assert specs[1].start == specs[1].resume == ["train", "--resume", *ws, "--rounds", "9",
                                                 "R1"]


def test_systemd_is_used_only_where_it_can_outlive_the_login(monkeypatch) -> None:
    from flctl.service import systemd

    answers: dict[tuple[str, ...], tuple[int, str]] = {}
    monkeypatch.setattr(systemd, "_run", lambda *argv: subprocess.CompletedProcess(
        argv, *answers.get(argv[:3], (0, "")), ""))
    monkeypatch.setattr(systemd.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(systemd, "local_user", lambda: "op")
    monkeypatch.setattr(systemd, "init_system", lambda: "none")
    assert systemd.why_not() == "systemd is not PID 1"
    monkeypatch.setattr(systemd, "init_system", lambda: "systemd")
    answers[("systemctl", "--user", "show-environment")] = (1, "")
    assert "no user manager" in systemd.why_not()
    answers[("systemctl", "--user", "show-environment")] = (0, "")
    answers[("loginctl", "show-user", "op")] = (0, "no\n")
    calls: list[tuple[str, ...]] = []
    answer = systemd._run
    monkeypatch.setattr(systemd, "_run", lambda *argv: calls.append(argv) or answer(*argv))
    assert "lingering is off for op" in systemd.why_not()
    assert not any("enable-linger" in call for call in calls)   # the account's to turn on
    answers[("loginctl", "show-user", "op")] = (0, "yes\n")
    assert systemd.why_not() is None
