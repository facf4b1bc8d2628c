"""Expected errors: one clear line, the documented exit code, no traceback."""

from __future__ import annotations

from pathlib import Path

from helpers import run_cli


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_no_workspace_is_exit_3(tmp_path: Path) -> None:
    result = run_cli("status", "-w", str(tmp_path))
    assert_one_line_error(result, 3, "flctl.yaml", "flctl init")


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    first = run_cli("init", str(tmp_path / "ws"), "--local", "2", "--json")
    assert first.returncode == 0, first.stderr
    assert first.json()["local_hosts"] == 2
    ca_before = (tmp_path / "ws" / "pki" / "ca.crt").read_bytes()
    again = run_cli("init", str(tmp_path / "ws"), "--local", "2")
    assert_one_line_error(again, 3, "already holds a workspace", "--force")
    assert (tmp_path / "ws" / "pki" / "ca.crt").read_bytes() == ca_before
    forced = run_cli("init", str(tmp_path / "ws"), "--local", "2", "--force")
    assert forced.returncode == 0
    assert (tmp_path / "ws" / "pki" / "ca.crt").read_bytes() != ca_before


def test_init_makes_secret_keys_0600(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    for name in ("ca.key", "coordinator.key"):
        assert (tmp_path / "pki" / name).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "pki").stat().st_mode & 0o777 == 0o700


def test_inventory_typo_names_file_line_and_field(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    inventory = tmp_path / "inventory.yaml"
    lines = inventory.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if "data_path: data/local2.npz" in line)
    lines.insert(index + 1, lines[index].replace("data_path: data/local2.npz", "ssh_prot: 22"))
    inventory.write_text("\n".join(lines) + "\n")
    result = run_cli("deploy", "-w", str(tmp_path))
    assert_one_line_error(result, 2, f"inventory.yaml:{index + 2}", "ssh_prot", "ssh_port")


def test_settings_error_names_the_field(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    settings = tmp_path / "flctl.yaml"
    settings.write_text(settings.read_text().replace("rounds: 20", "rounds: many"))
    result = run_cli("train", "-w", str(tmp_path))
    assert_one_line_error(result, 2, "flctl.yaml:", "training.rounds")


def test_cli_override_is_validated(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    result = run_cli("train", "-w", str(tmp_path), "--fraction", "1.5")
    assert_one_line_error(result, 2, "training.fraction")


def test_help_lists_commands_and_exit_codes() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("init", "deploy", "train", "status", "teardown", "demo"):
        assert command in result.stdout
    assert "Exit codes" in result.stdout


def test_packaged_example_inventory_matches_the_documented_one() -> None:
    from flctl.workspace import example_inventory

    root = Path(__file__).resolve().parents[1] / "inventory.example.yaml"
    assert example_inventory() == root.read_text()
