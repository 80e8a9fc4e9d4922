"""CLI conventions: --help with an example, --version, python -m, --json, --dry-run, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WRITERS = ["strip-prefix", "add-prefix", "rename", "extract", "convert", "bn-to-gn", "fold-bn"]
REPORTERS = ["inspect", "diff", "verify", "check", "scan", "plugins"] + WRITERS


def test_every_command_has_help_with_example(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in WRITERS + REPORTERS:
        assert name in out
        code, text, err = cli(name, "--help")
        assert code == 0, err
        assert "Example" in text, name


@pytest.mark.parametrize("name", WRITERS)
def test_writers_take_output_and_dry_run(cli, name):
    _, text, _ = cli(name, "--help")
    for opt in ("-o, --output", "--dry-run", "--json", "--format", "--in-place"):
        assert opt in text, (name, opt)


@pytest.mark.parametrize("name", REPORTERS)
def test_reporters_take_json(cli, name):
    _, text, _ = cli(name, "--help")
    assert "--json" in text


def test_version_and_module_entry():
    out = subprocess.run([sys.executable, "-m", "ckptsurgeon", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "0.1.0" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ckptsurgeon", "inspect", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "Example" in out.stdout


def test_installed_entry_point(sample_dir):
    from pathlib import Path

    exe = Path(sys.executable).with_name("ckpt-surgeon")
    out = subprocess.run([str(exe), "inspect", str(sample_dir / "seednet_dp.pt"), "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["prefix"] == "module." and info["tensors"] == 28


@pytest.mark.parametrize("args", [
    ["strip-prefix", "{s}/seednet_dp.pt"],
    ["add-prefix", "{s}/seednet.pt", "--prefix", "module."],
    ["rename", "{s}/seednet.pt", "--map", "fc=>head"],
    ["extract", "{s}/seednet.pt", "--layers", "conv1"],
    ["convert", "{s}/seednet.pt"],
    ["bn-to-gn", "{s}/seednet.pt", "--groups", "16", "--groups-policy", "nearest"],
])
def test_dry_run_writes_nothing(sample_dir, tmp_path, cli, args):
    out = tmp_path / "out.pt"
    argv = [a.format(s=sample_dir) for a in args] + ["-o", out, "--dry-run", "--json"]
    code, text, err = cli(*argv)
    assert code == 0, err
    rep = json.loads(text)
    assert (rep.get("save") or rep)["dry_run"] is True
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_output_is_an_error(sample_dir, cli):
    code, out, err = cli("strip-prefix", sample_dir / "seednet_dp.pt")
    assert code == 2 and "-o" in err and err.count("\n") == 1


def test_inspect_human_output(sample_dir, cli):
    code, out, err = cli("inspect", sample_dir / "seednet_resume.pt")
    assert code == 0
    assert "state dict at: model_state_dict" in out and "optimizer_state_dict" in out


def test_fold_and_bn_to_gn_cli(sample_dir, tmp_path, cli, models_py):
    code, out, err = cli("fold-bn", sample_dir / "bnnet.pt", "-o", tmp_path / "f.safetensors", "--model",
                         f"{models_py}:bnnet", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["folded"]) == 4 and rep["check"]["relative_error"] < 1e-5
    code, out, err = cli("bn-to-gn", sample_dir / "seednet.pt", "-o", tmp_path / "g.pt", "--model",
                         f"{models_py}:seednet", "--groups", "32", "--groups-policy", "nearest", "--calibrate", "32",
                         "--input-shape", "3,16,16", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["error_calibrated"] < rep["error_plain"]
