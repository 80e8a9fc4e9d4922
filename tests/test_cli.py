"""CLI conventions: --help with an example, --version, python -m, --json, --dry-run, exit codes."""

from __future__ import annotations

import json
import os
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


def test_every_option_of_every_command_says_what_it_does():
    import click

    from ckptsurgeon.cli import main_group

    ctx = click.Context(main_group)
    names = main_group.list_commands(ctx)
    assert set(WRITERS + REPORTERS) <= set(names)
    bare = [f"{name} {p.opts[0]}" for name in names for p in main_group.get_command(ctx, name).params
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not bare, bare


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


def test_console_exit_keeps_outputs_codes_and_hooks(sample_dir, tmp_path):
    """The console script skips interpreter teardown: outputs, exit codes, piped stdout, atexit
    hooks and a plugin's still-running thread must all come out as with a normal exit."""
    import os
    from pathlib import Path

    import torch

    exe = str(Path(sys.executable).with_name("ckpt-surgeon"))
    out = tmp_path / "stripped.pt"
    res = subprocess.run([exe, "-q", "strip-prefix", str(sample_dir / "seednet_dp.pt"), "-o", str(out), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["save"]["tensors"] == 28
    sd = torch.load(out, weights_only=True)
    assert "conv1.weight" in sd and not any(k.startswith("module.") for k in sd)

    res = subprocess.run([exe, "diff", str(sample_dir / "seednet.pt"), str(sample_dir / "seednet_finetuned.pt"),
                          "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and json.loads(res.stdout)["identical"] is False
    res = subprocess.run([exe, "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1

    (tmp_path / "lingering.py").write_text(
        "import atexit, threading, time\n"
        f"OUT = {str(tmp_path)!r}\n"
        "atexit.register(lambda: open(OUT + '/atexit-ran', 'w').close())\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    open(OUT + '/thread-finished', 'w').close()\n"
        "threading.Thread(target=late).start()\n")
    env = dict(os.environ, CKPT_SURGEON_PLUGINS="lingering", PYTHONPATH=str(tmp_path))
    res = subprocess.run([exe, "inspect", str(sample_dir / "seednet.pt"), "--json"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "atexit-ran").exists() and (tmp_path / "thread-finished").exists()
    env.pop("CKPT_SURGEON_PLUGINS")
    (tmp_path / "sitecustomize.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(tmp_path)!r} + '/atexit2-ran', 'w').close())\n")
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and (tmp_path / "atexit2-ran").exists()


def test_library_warnings_are_one_line(tmp_path):
    """torch's own warnings while loading (a quantized tensor: a deprecation, and the TypedStorage
    notice torch's loader triggers itself) reach stderr as single ckpt-surgeon lines."""
    import warnings
    from pathlib import Path

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)
    torch.save({"module.q": q, "module.w": torch.randn(2)}, tmp_path / "q.pt")
    exe = str(Path(sys.executable).with_name("ckpt-surgeon"))
    res = subprocess.run([exe, "inspect", str(tmp_path / "q.pt"), "--json"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tensors"] == 2
    lines = res.stderr.strip().splitlines()
    assert all(line.startswith("ckpt-surgeon: ") for line in lines), lines
    assert "TypedStorage" not in res.stderr
    # diff reads both files: torch warns from each call site; each text is said once
    res = subprocess.run([exe, "diff", str(tmp_path / "q.pt"), str(tmp_path / "q.pt")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == len(set(lines)) and all(line.startswith("ckpt-surgeon: ") for line in lines), lines


def test_a_file_of_many_state_dicts_is_reported_in_bounded_lines(tmp_path, cli):
    """2,000 models side by side (a hostile or just odd file): the ambiguity error was one 13 KB
    line and inspect printed a line per wrapper entry. Now both are bounded; --json keeps all."""
    import torch

    torch.save({f"m{i}": {"w": torch.ones(1)} for i in range(300)}, tmp_path / "many.pt")
    code, _, err = cli("strip-prefix", tmp_path / "many.pt", "-o", tmp_path / "o.pt")
    assert code == 2 and "m0, m1" in err and "... and 288 more" in err and len(err) < 600, err
    code, out, err = cli("inspect", tmp_path / "many.pt")
    assert code == 0 and "... and 260 more entries (all of them: --json)" in out and len(out.splitlines()) < 80, out
    code, out, _ = cli("inspect", tmp_path / "many.pt", "--key", "m299")
    assert "  m299: dict (1 key)  <- state dict" in out  # the chosen one is shown even past the cut
    code, text, _ = cli("inspect", tmp_path / "many.pt", "--json")
    assert code == 0 and len(json.loads(text)["wrapper"]) == 300
    code, _, err = cli("inspect", tmp_path / "many.pt", "--key", "zz")
    assert code == 2 and "(candidates: m0, m1," in err and "... and 288 more)" in err and len(err) < 300, err
    code, out, err = cli("convert", tmp_path / "many.pt", "--key", "m0", "--state-dict-only", "-o", tmp_path / "sd.pt")
    assert code == 0 and "not written (m1, m2," in out and "... and 289 more)" in out and len(out) < 400, out + err
    # a rename rule mapping 3,000 keys onto one name: the collision error names four of them
    torch.save({f"layers.{i}.w": torch.ones(1) for i in range(3000)}, tmp_path / "wide.pt")
    code, _, err = cli("rename", tmp_path / "wide.pt", "--map", "^.*=>x", "-o", tmp_path / "x.pt")
    assert code == 2 and "layers.0.w + layers.1.w + layers.2.w + layers.3.w + 2996 more -> x" in err, err
    assert len(err) < 300 and not (tmp_path / "x.pt").exists()


def test_an_install_without_torch_says_so_in_one_line(tmp_path):
    """torch is imported only by the commands that compute, so an environment that lacks it (a
    broken install, a torch-less container) failed in the middle of a command: an internal error
    from scan, "cannot be read as torch-zip" (blaming the file) from inspect. Now one line naming
    torch; and the commands that never need it still run."""
    import torch

    torch.save({"module.w": torch.randn(3), "module.q": torch.quantize_per_tensor(torch.randn(2), 0.1, 0,
                                                                                    torch.qint8)}, tmp_path / "q.pt")
    torch.save({"module.w": torch.randn(3)}, tmp_path / "p.pt")
    runner = ("import sys; sys.modules['torch'] = None; from ckptsurgeon.cli import main; "
              "sys.argv[0] = 'ckpt-surgeon'; main()")

    def run(*args):
        return subprocess.run([sys.executable, "-c", runner, *map(str, args)], capture_output=True, text=True,
                              timeout=120)

    for args in (["scan", tmp_path / "p.pt"], ["inspect", tmp_path / "q.pt"],
                 ["cast", tmp_path / "p.pt", "--dtype", "bf16", "-o", tmp_path / "c.pt"]):
        res = run(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (args, res.stderr)
        assert lines[0] == "ckpt-surgeon: error: this needs torch, which is not installed here (pip install torch)"
    res = run("strip-prefix", tmp_path / "p.pt", "-o", tmp_path / "s.pt")
    assert res.returncode == 0 and (tmp_path / "s.pt").exists(), res.stderr
    assert list(torch.load(tmp_path / "s.pt", weights_only=True)) == ["w"]


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


def test_missing_output_is_an_error(sample_dir, cli, tmp_path):
    code, out, err = cli("strip-prefix", sample_dir / "seednet_dp.pt")
    assert code == 2 and "-o" in err and err.count("\n") == 1
    code, _, err = cli("convert", sample_dir / "seednet.pt", "-o", tmp_path / "no" / "dir" / "x.pt")
    assert code == 2 and f"output directory {tmp_path / 'no' / 'dir'} does not exist" in err
    if os.path.isdir("/proc/self"):  # a directory that refuses new files with ENOENT: not "does not exist"
        code, _, err = cli("convert", sample_dir / "seednet.pt", "-o", "/proc/x.pt")
        assert code == 2 and "cannot create a file in /proc" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args,says", [
    (["extract", "{ck}", "-o", "x.pt"], "Missing option '--layers' (see: ckpt-surgeon extract --help)"),
    (["cast", "{ck}", "--dtype", "int3", "-o", "x.pt"], "Invalid value for '--dtype'"),
    (["inspect", "{ck}", "--depth", "0"], "Invalid value for '--depth': 0 is not in the range x>=1"),
    (["diff", "{ck}", "{ck}", "--depth", "-2"], "Invalid value for '--depth'"),
    (["diff", "{ck}"], "Missing argument 'B'"),
    (["no-such-command"], "No such command 'no-such-command' (see: ckpt-surgeon --help)"),
    (["--no-such-flag"], "No such option '--no-such-flag'"),
    (["strip-prefix", "{ck}", "--prefix", "", "-o", "x.pt"], "an empty prefix changes nothing"),
])
def test_usage_errors_are_one_line(sample_dir, tmp_path, cli, args, says):
    """A missing or invalid option, an unknown command: one line on stderr, exit 2, like every
    other error (click printed a usage block: three lines and a blank). --depth below 1 showed a
    table anyway; an empty --prefix to strip wrote an unchanged copy."""
    code, out, err = cli(*[tmp_path / a if a == "x.pt" else a.format(ck=sample_dir / "seednet_dp.pt") for a in args])
    assert code == 2 and out == "" and not (tmp_path / "x.pt").exists(), (code, out)
    assert err.count("\n") == 1 and err.startswith("ckpt-surgeon: error: ") and says in err, err


def test_inspect_human_output(sample_dir, cli):
    code, out, err = cli("inspect", sample_dir / "seednet_resume.pt")
    assert code == 0
    assert "state dict at: model_state_dict" in out and "optimizer_state_dict" in out


def test_inspect_lists_tensors_and_filters_them(tmp_path, cli):
    """--tensors lists every tensor (name, dtype, shape, size) from the headers alone; --match keeps
    the ones a module path, glob or regex names (also without the wrapper prefix), and a pattern
    naming none is one line, exit 2. The API returns the same rows."""
    import torch
    from safetensors.torch import save_file

    import ckptsurgeon as cs

    emb = torch.zeros(10, 4)
    sd = {"module.embed.weight": emb, "module.lm_head.weight": emb, "module.norm.weight": torch.ones(4, dtype=torch.bfloat16),
          "module.blocks.0.fc.weight": torch.zeros(3, 4), "module.blocks.1.fc.weight": torch.zeros(3, 4)}
    torch.save(sd, tmp_path / "m.pt")
    code, out, err = cli("inspect", tmp_path / "m.pt", "--tensors")
    assert code == 0, err
    lines = [line.split() for line in out.splitlines()]
    assert ["module.norm.weight", "bfloat16", "[4]", "8", "B"] in lines, out
    assert ["module.lm_head.weight", "=", "module.embed.weight", "float32", "[10,", "4]", "160", "B"] in lines, out
    assert "5 tensors listed" in out and "module (below module.)" not in out  # the list replaces the module table
    code, out, err = cli("inspect", tmp_path / "m.pt", "--match", "blocks.1", "--match", "re:norm", "--json")
    rows = json.loads(out)["tensor_list"]
    assert code == 0 and [r["name"] for r in rows] == ["module.norm.weight", "module.blocks.1.fc.weight"], out + err
    assert rows[1] == {"name": "module.blocks.1.fc.weight", "dtype": "float32", "shape": [3, 4], "numel": 12, "bytes": 48}
    code, out, err = cli("inspect", tmp_path / "m.pt", "--match", "blocks.7")
    assert code == 2 and err.startswith("ckpt-surgeon: error: --match pattern matched no tensor: 'blocks.7'"), err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli("inspect", tmp_path / "m.pt", "--match", ",")
    assert code == 2 and "names no pattern" in err, out + err
    save_file({k[len("module."):]: v.contiguous().clone() for k, v in sd.items()}, tmp_path / "m.safetensors")
    rows = cs.inspect(tmp_path / "m.safetensors", match=["*fc*"])["tensor_list"]
    assert [r["name"] for r in rows] == ["blocks.0.fc.weight", "blocks.1.fc.weight"]
    assert "tensor_list" not in cs.inspect(tmp_path / "m.safetensors")
    # no state dict chosen (G and D side by side): every candidate's tensors, named <candidate>/<name>
    torch.save({"G": {"net.0.weight": torch.zeros(2, 2)}, "D": {"fc.weight": torch.zeros(1, 2)}, "epoch": 1},
               tmp_path / "gan.pt")
    rows = cs.inspect(tmp_path / "gan.pt", tensors=True)["tensor_list"]
    assert [r["name"] for r in rows] == ["G/net.0.weight", "D/fc.weight"] and rows[1]["shape"] == [1, 2]
    code, out, err = cli("inspect", tmp_path / "gan.pt", "--match", "fc")
    assert code == 0 and "D/fc.weight" in out and "G/net.0.weight" not in out and "pick one with --key" in out, out
    code, _, err = cli("inspect", tmp_path / "gan.pt", "--match", "fc", "--match", "head")
    assert code == 2 and "matched no tensor: 'head'" in err, err
    # many tensors: plain columns, not a rich table that measured every cell (50,000 rows: 20 s)
    save_file({f"layers.{i // 100}.experts.{i % 100}.w": torch.zeros(1) for i in range(20000)}, tmp_path / "moe.safetensors")
    code, out, err = cli("inspect", tmp_path / "moe.safetensors", "--tensors")
    assert code == 0 and out.count("\n") == 20000 + 6 and "20,000 tensors listed" in out, (out[-300:], err)
    assert all("file" not in r for r in rows)  # one file: no column
    code, _, err = cli("convert", tmp_path / "m.safetensors", "-o", tmp_path / "shards/", "--max-shard-size", "100B")
    assert code == 0, err
    rows = cs.inspect(tmp_path / "shards", tensors=True)["tensor_list"]
    assert len({r["file"] for r in rows}) > 1 and all(os.path.isfile(tmp_path / "shards" / r["file"]) for r in rows)
    code, out, err = cli("inspect", tmp_path / "shards", "--match", "norm")
    row = next(line.split() for line in out.splitlines() if line.startswith("norm.weight"))
    assert code == 0 and row[-1].endswith(".safetensors"), out + err  # the file column


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


def test_inspect_folds_runs_of_alike_numbered_modules(tmp_path, cli):
    """A transformer's 32 identical blocks are one row of the module table (the JSON keeps
    every module); a block that differs breaks the run; thousands of rows are cut short."""
    import torch

    sd = {}
    for i in range(12):
        sd[f"model.layers.{i}.attn.q.weight"] = torch.zeros(4, 4)
        sd[f"model.layers.{i}.mlp.w.weight"] = torch.zeros(4, 4)
        if i == 5:
            sd[f"model.layers.{i}.extra.bias"] = torch.zeros(4)
    sd["model.norm.weight"] = torch.ones(4)
    sd.update({f"h.{i}.w": torch.zeros(1) for i in range(2)} | {f"blocks.{i}.{j}.w": torch.zeros(1 + (i % 2))
                                                                 for i in range(300) for j in range(2)})
    torch.save(sd, tmp_path / "m.pt")
    code, out, err = cli("inspect", tmp_path / "m.pt", "--depth", "4")
    assert code == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "model.layers.{0..4} (x5) 2 32" in lines and "model.layers.{0..4}.attn 1 16" in lines
    assert "model.layers.5 3 36" in lines and "model.layers.5.extra 1 4" in lines
    assert "model.layers.{6..11} (x6) 2 32" in lines and "model.layers.{6..11}.mlp 1 16" in lines
    assert "h.0 1 1" in lines and "h.1 1 1" in lines  # two alike: not worth a fold
    assert "blocks.0 2 2" in lines and "blocks.1 2 4" in lines  # alternating: nothing folds
    assert lines[-1] == "... and 717 more module rows (all of them: --json)"
    code, out, _ = cli("inspect", tmp_path / "m.pt", "--depth", "4", "--json")
    assert len(json.loads(out)["modules"]) == 1 + 1 + 12 * 3 + 1 + 1 + 1 + 2 + 1 + 300 * 3


def test_inspect_tree_of_a_safetensors_file_is_in_model_order(tmp_path, cli):
    """safetensors orders a file's keys by dtype, then alphabetically: a BatchNorm's int64
    counter comes first and layer.10 before layer.2. The module table still shows each module
    under its own parent, numbered ones in numeric order (folded into one run)."""
    import torch
    from safetensors.torch import save_file

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    sd = {f"enc.{k}": v for k, v in net.state_dict().items()}
    sd |= {f"dec.{k}": v.clone() for k, v in net.state_dict().items() if "num_batches" not in k}
    sd |= {f"blocks.layer.{i}.w": torch.zeros(2) for i in range(12)}
    save_file(sd, tmp_path / "m.safetensors")
    code, out, err = cli("inspect", tmp_path / "m.safetensors", "--depth", "3")
    assert code == 0, err
    rows = [line.split()[0] for line in out.splitlines()[out.splitlines().index(next(
        x for x in out.splitlines() if x.startswith("module"))) + 1:]]
    # enc first: its int64 counter is the file's first key; then the file's (alphabetical) order
    assert rows == ["enc", "enc.0", "enc.1", "enc.2", "blocks", "blocks.layer", "blocks.layer.{0..11}",
                    "dec", "dec.0", "dec.1", "dec.2"], out


def test_a_bare_tensor_or_list_is_named_with_the_way_out(tmp_path, cli):
    """torch.save(tensor) / torch.save([t1, t2]): no names to give the tensors; the error says
    what the file holds (not an internal class name) and how to save it."""
    import torch

    torch.save(torch.zeros(2, 3), tmp_path / "bare.pt")
    torch.save([torch.ones(2), 3], tmp_path / "list.pt")
    for name, says in (("bare.pt", "one tensor [2, 3] float32"), ("list.pt", "a list of 2 items (1 tensor)")):
        code, _, err = cli("convert", tmp_path / name, "-o", tmp_path / "x.safetensors")
        assert code == 2 and says in err and "torch.save({'name'" in err and "TensorRef" not in err, err
    # a tuple around a state dict (model, optimizer, epoch): found at position 0, each item shown
    lin = torch.nn.Linear(3, 3)
    torch.save((lin.state_dict(), torch.optim.Adam(lin.parameters()).state_dict(), 5), tmp_path / "tuple.pt")
    code, out, err = cli("inspect", tmp_path / "tuple.pt")
    assert code == 0 and "  0: dict (2 keys)  <- state dict\n  1: dict (2 keys)\n  2: 5\n" in out, out + err


def test_inspect_names_tied_weights(tmp_path, cli):
    """A GPT-style file keeps the tied LM head under its own name (same storage): inspect says
    so and counts parameters both ways; views of one storage that differ are not ties."""
    import torch

    emb = torch.randn(10, 4)
    base = torch.arange(8.0)
    torch.save({"embed.weight": emb, "lm_head.weight": emb, "a": base[:4], "b": base[4:]}, tmp_path / "t.pt")
    code, out, err = cli("inspect", tmp_path / "t.pt")
    assert code == 0 and "tied: lm_head.weight = embed.weight (48 parameters counting each tensor once)" in out, err
    code, out, _ = cli("inspect", tmp_path / "t.pt", "--json")
    info = json.loads(out)
    assert info["tied"] == [["lm_head.weight", "embed.weight"]] and info["parameters"] == 88
    assert info["unique_parameters"] == 48


def test_a_compressed_checkpoint_is_named(tmp_path, cli):
    """A checkpoint someone gzipped (or xz, bzip2, zstd) is named as compressed, not 'unrecognised'."""
    import bz2
    import gzip
    import lzma

    import torch

    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    raw = (tmp_path / "m.pt").read_bytes()
    for name, data, what in (("m.pt.gz", gzip.compress(raw), "gzip"), ("m.pt.xz", lzma.compress(raw), "xz"),
                             ("m.pt.bz2", bz2.compress(raw), "bzip2"),
                             ("m.pt.zst", b"\x28\xb5\x2f\xfd" + bytes(60), "zstd")):
        (tmp_path / name).write_bytes(data)
        code, _, err = cli("inspect", tmp_path / name)
        assert code == 2 and f"{what}-compressed: decompress it first" in err, err


def test_quiet_and_debug_work_after_the_command_too(sample_dir, tmp_path, cli):
    from pathlib import Path

    import torch

    src = Path(__file__).parent / "data" / "gpu" / "lightning_fsdp.ckpt"
    code, out, err = cli("convert", src, "-o", tmp_path / "a.safetensors")
    assert code == 0 and "note: " in err and "lightning_fsdp.ckpt: merged Lightning's meta.pt" in err
    for args in (("-q", "convert", src, "-o", tmp_path / "b.safetensors"),
                 ("convert", src, "-o", tmp_path / "c.safetensors", "-q"),
                 ("convert", src, "--quiet", "-o", tmp_path / "d.safetensors")):
        code, out, err = cli(*args)
        assert code == 0 and "note:" not in err, args
    # the report's own notes on stdout (what the output did not carry) go too; --json keeps them
    md = tmp_path / "md.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict(), md)
    code, out, _ = cli("convert", md, "-o", tmp_path / "e.safetensors")
    assert code == 0 and "note: state_dict._metadata (module versions) not carried" in out
    for args in (("-q", "convert", md, "-o", tmp_path / "f.safetensors"),
                 ("strip-prefix", tmp_path / "e.safetensors", "--prefix", "0.", "-o", tmp_path / "g.st", "-q"),
                 ("-q", "inspect", src)):
        code, out, _ = cli(*args)
        assert code == 0 and "note:" not in out and out.strip(), (args, out)
    code, out, _ = cli("-q", "convert", md, "-o", tmp_path / "h.safetensors", "--json")
    assert code == 0 and any("_metadata" in n for n in json.loads(out)["notes"])
    code, _, err = cli("strip-prefix", tmp_path / "missing.pt", "-o", tmp_path / "x.pt", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().endswith("no such file or directory")
    code, _, err = cli("strip-prefix", tmp_path / "missing.pt", "-o", tmp_path / "x.pt")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, out, _ = cli("diff", "--help")
    assert "-q, --quiet" in out and "--debug" in out


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`ckpt-surgeon diff a b | head -1`: the pipe closed under a command still printing (rich
    flushes each print) ends it quietly, as `cat` does, not with an internal error."""
    import torch

    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(300)}, tmp_path / "a.pt")
    torch.save({f"layer{i}.weight": torch.ones(2) for i in range(300)}, tmp_path / "b.pt")
    for args in (["diff", tmp_path / "a.pt", tmp_path / "b.pt"], ["inspect", tmp_path / "a.pt", "--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "ckptsurgeon", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the first line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) in (0, 1) and "error" not in err and "Traceback" not in err, err


def test_inspect_shows_small_configs_and_folds_numbered_candidates(tmp_path, cli):
    """inspect shows a small flat mapping of plain values (Lightning's hyper_parameters, AMP
    scaler state) inline, and folds an optimizer's per-parameter states in the candidate list."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "hyper_parameters": {"lr": 0.01, "name": "run1", "dropout": None},
                "big": {f"k{i}": i for i in range(20)}}, tmp_path / "r.pt")
    code, out, err = cli("inspect", tmp_path / "r.pt")
    assert code == 0, err
    assert "hyper_parameters: {lr: 0.01, name: 'run1', dropout: None}" in out
    assert "big: dict (20 keys)" in out
    assert "optimizer_state_dict/state/{0..3}" in out, out
