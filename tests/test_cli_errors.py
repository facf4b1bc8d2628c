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


def test_init_force_keeps_the_old_ca_key_in_a_backup_it_names(tmp_path: Path) -> None:
    """Hosts deployed with the old CA trust only it: losing its key locks the operator out."""
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "2").returncode == 0
    first_key = (root / "pki" / "ca.key").read_bytes()
    forced = run_cli("init", str(root), "--local", "2", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    backup = Path(forced.json()["pki_backup"])
    assert backup.parent == root.resolve() and backup.name.startswith("pki.backup-")
    assert (backup / "ca.key").read_bytes() == first_key
    assert (root / "pki" / "ca.key").read_bytes() != first_key
    assert backup.stat().st_mode & 0o777 == 0o700
    for name in ("ca.key", "coordinator.key"):
        assert (backup / name).stat().st_mode & 0o777 == 0o600
    second_key = (root / "pki" / "ca.key").read_bytes()
    again = run_cli("init", str(root), "--local", "2", "--force")  # same second: a new name
    assert again.returncode == 0, again.stderr
    backups = sorted(root.glob("pki.backup-*"))
    assert len(backups) == 2 and (backup / "ca.key").read_bytes() == first_key
    newest = next(b for b in backups if b != backup)
    assert (newest / "ca.key").read_bytes() == second_key
    assert str(newest) in " ".join(again.stdout.split())  # the message names it


def test_demo_dir_refuses_an_existing_workspace(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    ca_key = (tmp_path / "pki" / "ca.key").read_bytes()
    inventory = (tmp_path / "inventory.yaml").read_text()
    result = run_cli("demo", "--dir", str(tmp_path), "--rounds", "1")
    assert_one_line_error(result, 3, "already holds a workspace", "new or empty directory")
    assert (tmp_path / "pki" / "ca.key").read_bytes() == ca_key
    assert (tmp_path / "inventory.yaml").read_text() == inventory
    assert not list(tmp_path.glob("pki.backup-*")) and not (tmp_path / "runs").exists()


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
