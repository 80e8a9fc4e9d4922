"""Shared fixtures: real checkpoints written by torch and safetensors, built once per session."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """The entry-point index goes to a session folder, not ~/.cache (subprocesses inherit it)."""
    old = os.environ.get("CKPT_SURGEON_CACHE_DIR")
    os.environ["CKPT_SURGEON_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("CKPT_SURGEON_CACHE_DIR", None)
    else:
        os.environ["CKPT_SURGEON_CACHE_DIR"] = old


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def models():
    """samples/models.py as a module."""
    return _load_module("ckpt_samples_models", SAMPLES / "models.py")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory, models):
    """The sample checkpoints (samples/build.py) in a fresh session directory."""
    out = tmp_path_factory.mktemp("samples")
    build = _load_module("ckpt_samples_build", SAMPLES / "build.py")
    build.main(str(out))
    return out


@pytest.fixture
def fresh_manager():
    """A freshly built plugin manager for plugin tests (and the cached one restored after)."""
    from ckptsurgeon import manager

    old = manager._MANAGER
    manager.reset_manager(None)
    yield manager.get_manager
    manager.reset_manager(old)


@pytest.fixture
def cli():
    """Invoke the CLI in-process with click's CliRunner; returns (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from ckptsurgeon.cli import main_group

    def run(*args):
        try:
            runner = CliRunner(mix_stderr=False)
        except TypeError:  # click >= 8.2 keeps stderr apart by default
            runner = CliRunner()
        res = runner.invoke(main_group, [str(a) for a in args], catch_exceptions=False)
        return res.exit_code, res.stdout, res.stderr

    return run


@pytest.fixture
def flip_byte():
    """Damage a file in place: XOR one byte (a bit rot the zip CRC must catch)."""

    def flip(path, offset: int, mask: int = 0xFF) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ mask]))

    return flip


def run_cli(*args, env=None, timeout=120):
    """The installed entry point in a subprocess."""
    exe = Path(sys.executable).with_name("ckpt-surgeon")
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture
def seednet_sd(models):
    import torch

    torch.manual_seed(0)
    m = models.randomize_norm_stats(models.seednet(), seed=3)
    return m.state_dict()


@pytest.fixture(scope="session")
def models_py():
    """'path/to/samples/models.py' for --model specs."""
    return str(SAMPLES / "models.py")


def same_tree(a, b, where=""):
    """Two nested structures of dicts, lists, tuples, tensors and plain values are equal: same
    types, same keys in the same order, tensors bitwise equal with the same dtype and shape."""
    import torch

    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()), where
    else:
        assert a == b, where


@pytest.fixture
def same():
    """same_tree (above) for tests: ``same(a, b)``."""
    return same_tree
