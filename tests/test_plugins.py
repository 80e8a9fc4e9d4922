"""The plugin contract: third-party plugins add commands/formats/operations; broken ones only warn."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ckptsurgeon
from ckptsurgeon.hookspecs import HOOK_NAMES

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The two test plugin packages, pip-installed into a private directory."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    for pkg in ("plugin_pkg", "broken_plugin"):
        build = tmp_path_factory.mktemp("build")
        shutil.copytree(HERE / pkg, build / pkg)  # pip builds in the source tree: keep the repo clean
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(build / pkg)],
                       check=True, capture_output=True, cwd=build, timeout=300)
    return target


def _cli(site, *args, extra_env=None):
    env = dict(os.environ, PYTHONPATH=str(site))
    env.update(extra_env or {})
    exe = Path(sys.executable).with_name("ckpt-surgeon")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_third_party_command_format_operation(plugin_site, sample_dir, tmp_path):
    out = _cli(plugin_site, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    info = {p["name"]: p for p in rep["plugins"]}
    assert info["npz_demo"]["status"] == "loaded"
    assert info["npz_demo"]["distribution"] == "ckpt-surgeon-npz-demo"
    assert set(info["npz_demo"]["hooks"]) == {"ckptsurgeon_commands", "ckptsurgeon_formats", "ckptsurgeon_operations"}
    assert rep["provides"]["formats"]["npz"] == "npz_demo"
    assert rep["provides"]["commands"]["count"] == "npz_demo"
    # the command
    res = _cli(plugin_site, "count", sample_dir / "seednet.pt")
    assert res.returncode == 0 and res.stdout.strip() == "28 tensors"
    # the format: written by extension, read back by sniffing, compared with the original
    res = _cli(plugin_site, "convert", sample_dir / "seednet.pt", "-o", tmp_path / "w.npz")
    assert res.returncode == 0, res.stderr
    res = _cli(plugin_site, "diff", sample_dir / "seednet.pt", tmp_path / "w.npz")
    assert res.returncode == 0, res.stdout + res.stderr
    # the operation, through the API
    code = ("import ckptsurgeon as cs; print(cs.tensor_count(cs.load(%r)))" % str(sample_dir / "seednet.pt"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(plugin_site)), timeout=60)
    assert res.stdout.strip() == "28"


def test_broken_plugins_warn_but_cli_works(plugin_site, sample_dir):
    for _ in range(2):  # a broken plugin is never recorded in the plugin index: it warns on every run
        res = _cli(plugin_site, "inspect", sample_dir / "seednet.pt", "--json")
        assert res.returncode == 0
        assert json.loads(res.stdout)["tensors"] == 28
        assert "broken_import" in res.stderr and "broken on purpose" in res.stderr
        assert "bad_hook" in res.stderr and "unknown hook" in res.stderr
    rep = json.loads(_cli(plugin_site, "plugins", "--json").stdout)
    status = {p["name"]: p["status"] for p in rep["plugins"]}
    assert status["broken_import"] == "broken" and status["bad_hook"] == "broken"


def test_disable_autoload_env(plugin_site):
    res = _cli(plugin_site, "plugins", "--json", extra_env={"CKPT_SURGEON_DISABLE_PLUGIN_AUTOLOAD": "1"})
    rep = json.loads(res.stdout)
    status = {p["name"]: p["status"] for p in rep["plugins"]}
    assert status["npz_demo"] == "disabled" and status["prefix"] == "loaded"
    assert "count" not in rep["provides"]["commands"] and "broken on purpose" not in res.stderr


def _pip_install(pkg: str, target: Path, tmp_path: Path) -> None:
    import shutil

    build = tmp_path / f"build-{pkg}"
    shutil.copytree(HERE / pkg, build / pkg)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(build / pkg)],
                   check=True, capture_output=True, cwd=build, timeout=300)


def _plugin_names(site, cache_dir) -> set:
    res = _cli(site, "plugins", "--json", extra_env={"CKPT_SURGEON_CACHE_DIR": str(cache_dir)})
    assert res.returncode == 0, res.stderr
    return {p["name"] for p in json.loads(res.stdout)["plugins"]}


def test_entry_point_index_is_reused_and_rebuilt_when_sys_path_changes(tmp_path):
    """The index of entry points saves importing importlib.metadata on every run; installing a
    plugin into any sys.path folder (its mtime changes) makes the next run scan again."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    before = _plugin_names(site, cache)
    assert "prefix" in before and "npz_demo" not in before
    (index,) = cache.glob("entry-points-*.json")
    # the index is what the next run believes: an entry only it lists shows up (as broken)
    data = json.loads(index.read_text())
    data["entry_points"].append(["from_the_index", "no_such_module_xyz", "nobody", "1"])
    index.write_text(json.dumps(data))
    assert "from_the_index" in _plugin_names(site, cache)
    # a file written into a sys.path folder (an output in the working directory, first on
    # sys.path under `python -m`) changes its time but no distribution: the index stays
    mtime = site.stat().st_mtime_ns
    (site / "out.pt").write_bytes(b"x")
    assert site.stat().st_mtime_ns != mtime
    assert "from_the_index" in _plugin_names(site, cache)
    # a damaged index is ignored, never fatal
    index.write_text("{not json")
    assert _plugin_names(site, cache) == before
    # an install into a sys.path folder invalidates it
    data["entry_points"].append(["from_the_index", "no_such_module_xyz", "nobody", "1"])
    index.write_text(json.dumps(data))
    _pip_install("plugin_pkg", site, tmp_path)
    after = _plugin_names(site, cache)
    assert "npz_demo" in after and "from_the_index" not in after
    # switched off: no file written, same answer
    xdg = tmp_path / "xdg"
    res = _cli(site, "plugins", "--json", extra_env={"CKPT_SURGEON_CACHE_DIR": "off", "XDG_CACHE_HOME": str(xdg)})
    assert {p["name"] for p in json.loads(res.stdout)["plugins"]} == after and not xdg.exists()
    res = _cli(site, "plugins", "--json", extra_env={"CKPT_SURGEON_CACHE_DIR": "", "XDG_CACHE_HOME": str(xdg)})
    assert len(list(xdg.glob("ckpt-surgeon/entry-points-*.json"))) == 1  # unset: the XDG default
    # an unwritable cache folder only means scanning every time
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    assert _plugin_names(site, blocker / "sub") == after


def test_explicit_plugin_module_and_conflicts(fresh_manager, monkeypatch, tmp_path):
    mod = tmp_path / "dup_plugin.py"
    mod.write_text(
        "import click\nfrom ckptsurgeon import hookimpl\nfrom ckptsurgeon.types import ModelTransform\n"
        "@click.command('strip-prefix')\ndef c():\n    pass\n"
        "@hookimpl\ndef ckptsurgeon_commands():\n    return [c]\n"
        "@hookimpl\ndef ckptsurgeon_model_transforms():\n    return [ModelTransform('noop', lambda m, p: m)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CKPT_SURGEON_PLUGINS", "dup_plugin")
    m = fresh_manager()
    cmds = m.commands()
    assert cmds["strip-prefix"][1] == "prefix"  # first registration wins
    assert any("strip-prefix" in c and "dup_plugin" in c for c in m.conflicts)
    assert m.transform("noop").apply("x", {}) == "x"
    assert "bn-to-gn" in m.model_transforms() and "fold-bn" in m.model_transforms()


def test_every_hook_is_documented():
    readme = (REPO / "README.md").read_text()
    for name in HOOK_NAMES:
        assert name in readme, f"{name} is not documented in README.md"
        spec = getattr(ckptsurgeon.hookspecs.CkptSurgeonSpecs, name)
        assert "Example" in (spec.__doc__ or ""), f"{name} has no example"


def test_every_hook_has_a_test():
    text = "".join(p.read_text() for p in HERE.glob("test_*.py") if p.name != "test_plugins.py")
    text += (HERE / "plugin_pkg" / "ckpt_surgeon_npz_demo.py").read_text()
    here = Path(__file__).read_text()
    for name in HOOK_NAMES:
        short = name.replace("ckptsurgeon_", "")
        assert name in text or re.search(short, here), f"no test exercises {name}"


def test_builtin_plugins_are_entry_points():
    """First-party plugins are registered exactly like third-party ones: through the entry points."""
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="ckptsurgeon")}
    for name in ("prefix", "rename", "extract", "partial", "diff", "norm", "fold", "verify", "scan", "cast", "average"):
        assert eps[name] == f"ckptsurgeon.plugins.{name}"
    res = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('plugins'))"],
                         capture_output=True, text=True, cwd="/", timeout=60)
    assert res.stdout.strip() == "None"  # no bare 'plugins' import name leaks into site-packages


def test_api_builds_one_plugin_manager(tmp_path):
    """``import ckptsurgeon; ckptsurgeon.load(...)`` in a fresh interpreter: the plugins'
    ``from ckptsurgeon import cliutil`` must import the submodule, not ask the plugin manager
    being built for an operation of that name (that built 10 nested managers)."""
    from safetensors.numpy import save_file
    import numpy as np

    path = tmp_path / "m.safetensors"
    save_file({"module.w": np.ones((2, 2), np.float32)}, str(path))
    code = (
        "import ckptsurgeon as cs, ckptsurgeon.manager as m\n"
        "built = []\n"
        "init = m.Manager.__init__\n"
        "m.Manager.__init__ = lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1]\n"
        f"ck = cs.load({str(path)!r})\n"
        "new, _ = cs.strip_prefix(ck)\n"
        "assert cs.summary.inspect(ck)['tensors'] == 1  # a submodule, imported on first use (README)\n"
        "print(len(built), list(new.state), m.get_manager().problems)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split(None, 1) == ["1", "['w'] []\n"]
    with pytest.raises(AttributeError):
        ckptsurgeon.no_such_operation  # noqa: B018


HEAVY_PLUGIN = '''
import os
import click
from ckptsurgeon import hookimpl
from ckptsurgeon.types import Operation

with open(os.environ["HEAVY_MARK"], "a") as f:  # stands for an expensive import (torch, a model zoo)
    f.write("imported\\n")

@click.command("heavy")
def heavy():
    click.echo("heavy ran")

@hookimpl
def ckptsurgeon_commands():
    return [heavy]

@hookimpl
def ckptsurgeon_operations():
    return [Operation("heavy_op", lambda ck: (ck, {}))]
'''

RUN_AND_LIST = (
    "import sys\n"
    "from ckptsurgeon.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    "from importlib.metadata import entry_points\n"
    "eps = {ep.value for ep in entry_points(group='ckptsurgeon')}\n"
    "print('PLUGINS', sorted(m.split('.')[-1] for m in sys.modules if m in eps), code)\n")  # (not their helpers)


def _fake_dist(site: Path, module_source: str) -> Path:
    """A distribution as pip leaves it (module + dist-info with its entry points), without pip."""
    site.mkdir(exist_ok=True)
    (site / "heavy_plugin.py").write_text(module_source)
    info = site / "heavy_plugin-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: heavy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ckptsurgeon]\nheavy = heavy_plugin\n")
    return site / "heavy_plugin.py"


def test_plugins_are_imported_only_when_what_they_provide_is_asked_for(tmp_path, sample_dir):
    """With the plugin index (beside the entry-point index), a run imports only the plugins it
    needs: strip-prefix imports the prefix plugin, not the other eleven nor a third-party plugin
    with an expensive import; that plugin's own command imports it. A changed plugin file, or an
    index that no longer tells the truth, means importing it as before -- never a missing command."""
    site, cache, mark = tmp_path / "site", tmp_path / "cache", tmp_path / "mark"
    source = _fake_dist(site, HEAVY_PLUGIN)
    env = dict(os.environ, PYTHONPATH=str(site), CKPT_SURGEON_CACHE_DIR=str(cache), HEAVY_MARK=str(mark),
               CKPT_SURGEON_FSYNC="0")

    def run(*args):
        res = subprocess.run([sys.executable, "-c", RUN_AND_LIST, *map(str, args)], capture_output=True, text=True,
                             env=env, timeout=120, cwd=tmp_path)
        line = [x for x in res.stdout.splitlines() if x.startswith("PLUGINS")][-1]
        return res, line, (mark.read_text().count("imported") if mark.exists() else 0)

    strip = ("-q", "strip-prefix", sample_dir / "seednet_dp.pt", "-o", tmp_path / "out.pt")
    res, line, n = run(*strip)
    assert "0" in line.split()[-1] and n == 1 and len(eval(line[8:line.rindex("]") + 1])) == 13  # first run: all (12 + heavy)
    res, line, n = run(*strip)
    assert line == "PLUGINS ['prefix'] 0" and n == 1, (res.stderr, line)
    res, line, n = run("heavy")
    assert "heavy ran" in res.stdout and n == 2 and "prefix" not in line
    res, line, n = run("-q", "extract", sample_dir / "seednet.pt", "--layers", "conv1", "-o", tmp_path / "e.pt")
    assert line == "PLUGINS ['extract'] 0" and n == 2, (res.stderr, line)
    # a command that needs another plugin's model transform (verify of a fold-bn output) imports that one too
    model = f"{REPO / 'samples' / 'models.py'}:bnnet"
    res, line, n = run("-q", "fold-bn", sample_dir / "bnnet.pt", "-o", tmp_path / "folded.pt", "--model", model)
    assert line == "PLUGINS ['fold'] 0", (res.stderr, line)
    res, line, n = run("verify", sample_dir / "bnnet.pt", tmp_path / "folded.pt", "--model", model,
                       "--input-shape", "2,3,16,16")
    assert "EQUIVALENT" in res.stdout and line == "PLUGINS ['fold', 'verify'] 0", (res.stdout, res.stderr, line)
    # the API's operations: every plugin that has operations
    res = subprocess.run([sys.executable, "-c", "import ckptsurgeon as cs; print(cs.heavy_op)"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "lambda" in res.stdout, res.stderr
    # an edit of the plugin (an editable install): imported again, recorded again
    source.write_text(HEAVY_PLUGIN + "\n# changed\n")
    assert run(*strip)[2] == 4 and run(*strip)[2] == 4
    # an index that lies (the command moved to another plugin's record): found all the same
    (index,) = cache.glob("plugins-*.json")
    data = json.loads(index.read_text())
    for key, rec in data["plugins"].items():
        if key.startswith("heavy\0"):
            rec["provides"]["ckptsurgeon_commands"] = []
        if key.startswith("rename\0"):
            rec["provides"]["ckptsurgeon_commands"] = ["heavy"]
    index.write_text(json.dumps(data))
    res, line, n = run("heavy")
    assert "heavy ran" in res.stdout and n == 5 and "rename" in line
    # a damaged index (wrong types anywhere in a record) is ignored, never fatal
    data = json.loads(index.read_text())
    for rec, bad in zip(data["plugins"].values(), ({"ckptsurgeon_commands": 5}, ["x"], None, {"a": [1]})):
        rec["provides"] = bad
    rec["files"] = [[1, 2]]
    index.write_text(json.dumps(data))
    res, line, n = run(*strip)
    assert line.endswith(" 0") and not res.stderr, res.stderr
    index.write_text(json.dumps({"head": data["head"], "plugins": {"x": 1, "heavy\0heavy_plugin\0\0": "y"}}))
    res, line, n = run(*strip)
    assert line.endswith(" 0") and not res.stderr, res.stderr
    # `plugins` shows every plugin, in entry-point order, the same as without the index
    listed = [p["name"] for p in json.loads(run("plugins", "--json")[0].stdout.split("PLUGINS")[0])["plugins"]]
    env["CKPT_SURGEON_CACHE_DIR"] = "off"
    assert listed == [p["name"] for p in json.loads(run("plugins", "--json")[0].stdout.split("PLUGINS")[0])["plugins"]]
    assert "heavy" in listed and len(listed) == 14
