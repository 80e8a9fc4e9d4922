"""diff: planted changes are exactly what is reported; alignment; formats; JSON schema; exit codes."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

import ckptsurgeon as cs

SCHEMA_KEYS = {"schema", "a", "b", "alignment", "tolerance", "only_in_a", "only_in_b", "tied_only_in_a",
               "tied_only_in_b", "renamed", "shape_changed",
               "dtype_changed", "equal", "close", "changed", "modules", "nonfinite", "metadata", "differences",
               "identical", "verdict"}
CHANGED_KEYS = {"name", "shape", "dtype", "max_abs", "mean_abs", "rel_l2", "cosine", "n_diff", "numel"}


def test_diff_self_is_empty(sample_dir, cli):
    rep = cs.diff(sample_dir / "seednet_resume.pt", sample_dir / "seednet_resume.pt")
    assert rep["identical"] and not rep["differences"] and rep["equal"] == 28
    code, out, _ = cli("diff", sample_dir / "seednet_resume.pt", sample_dir / "seednet_resume.pt")
    assert code == 0 and "identical" in out


@pytest.mark.parametrize("other", ["seednet.safetensors", "seednet_hf", "seednet_legacy.pt", "seednet_dp.pt",
                                   "seednet_compiled.pt"])
def test_diff_across_formats_and_prefixes(sample_dir, other, cli):
    rep = cs.diff(sample_dir / "seednet.pt", sample_dir / other)
    assert not rep["differences"], rep["verdict"]
    if other in ("seednet_dp.pt", "seednet_compiled.pt"):
        assert rep["alignment"]["applied"]
    code, _, _ = cli("diff", sample_dir / "seednet.pt", sample_dir / other)
    assert code == 0


def test_deepdiff_only_imported_to_describe_a_difference(sample_dir, tmp_path):
    """Equal non-tensor content is settled without importing deepdiff (~0.2 s); types still count."""
    import subprocess
    import sys

    sd = torch.load(sample_dir / "seednet.pt", weights_only=True)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "a.pt")
    torch.save({"state_dict": sd, "epoch": 3.0}, tmp_path / "b.pt")
    code = ("import sys, ckptsurgeon as cs; r = cs.diff(sys.argv[1], sys.argv[2]); "
            "print(int(r['differences']), int('deepdiff' in sys.modules))")
    run = lambda a, b: subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True,  # noqa: E731
                                      text=True, check=True).stdout.split()
    assert run(tmp_path / "a.pt", tmp_path / "a.pt") == ["0", "0"]
    assert run(tmp_path / "a.pt", tmp_path / "b.pt") == ["1", "1"]  # 3 vs 3.0: a type change
    rep = cs.diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert "type_changes" in rep["metadata"]


def test_no_align_reports_keys(sample_dir):
    rep = cs.diff(sample_dir / "seednet.pt", sample_dir / "seednet_dp.pt", align=False)
    assert rep["differences"] and len(rep["only_in_a"]) + len(rep["renamed"]) == 28


def test_planted_changes_exactly(sample_dir, tmp_path, cli):
    sd = torch.load(sample_dir / "seednet.pt", weights_only=True)
    b = OrderedDict((k, v.clone()) for k, v in sd.items())
    b["conv3.weight"] += 0.05
    b["ln.bias"][0] = 1e6
    b["fc.weight"] = b["fc.weight"].half().float()  # tiny change: within atol 1e-2
    b["extra.w"] = torch.ones(2)
    del b["gn3.bias"]
    b["conv4.bias"] = b["conv4.bias"].double()
    b["bn1.weight"] = torch.cat([b["bn1.weight"], torch.ones(1)])
    b["renamed.bn4.weight"] = b.pop("bn4.weight")
    torch.save({"state_dict": b, "epoch": 9, "hparams": {"lr": 0.1}}, tmp_path / "b.pt")
    torch.save({"state_dict": sd, "epoch": 3, "hparams": {"lr": 0.01}}, tmp_path / "a.pt")
    rep = cs.diff(tmp_path / "a.pt", tmp_path / "b.pt", atol=1e-2)
    assert set(SCHEMA_KEYS) <= set(rep) and rep["schema"] == "ckpt-surgeon.diff/1"
    assert [c["name"] for c in rep["changed"]] == ["ln.bias", "conv3.weight"]  # most changed first
    assert set(CHANGED_KEYS) <= set(rep["changed"][0])
    assert rep["changed"][1]["max_abs"] == pytest.approx(0.05, rel=1e-3)
    assert [c["name"] for c in rep["close"]] == ["fc.weight"]
    assert rep["only_in_a"] == ["gn3.bias"] and rep["only_in_b"] == ["extra.w"]
    assert rep["renamed"] == [{"a": "bn4.weight", "b": "renamed.bn4.weight"}]
    assert rep["shape_changed"] == [{"name": "bn1.weight", "a": [16], "b": [17]}]
    (dt,) = rep["dtype_changed"]  # a lossless cast: the values did not move
    assert (dt["name"], dt["a"], dt["b"], dt["max_abs"], dt["n_diff"]) == ("conv4.bias", "float32", "float64", 0, 0)
    mods = {m["module"]: m for m in rep["modules"]}
    assert mods["conv3"]["changed"] == 1 and mods["conv1"]["changed"] == 0
    assert mods["ln"]["rel_l2"] > mods["conv3"]["rel_l2"] > 0
    meta = rep["metadata"]["values_changed"]
    assert meta["root['epoch']"] == {"new_value": 9, "old_value": 3}
    assert meta["root['hparams']['lr']"]["new_value"] == 0.1
    code, out, _ = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json")
    assert code == 1
    parsed = json.loads(out)
    assert set(SCHEMA_KEYS) <= set(parsed)


def test_printed_report_of_a_large_difference_is_bounded(tmp_path, cli):
    """Two 400-module models that differ everywhere (plus renames and reshapes): the printed
    report printed every module row (3,000 lines for 3,000 modules); each list now stops at 30
    rows and counts the rest, and --json keeps every entry."""
    a = OrderedDict((f"l{i}.w", torch.ones(2)) for i in range(400))
    b = OrderedDict((f"l{i}.w", torch.full((2,), float(i + 2))) for i in range(400))
    a.update((f"s{i}.w", torch.ones(4)) for i in range(40))
    b.update((f"s{i}.w", torch.ones(2, 2)) for i in range(40))
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    code, out, err = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 1 and len(out.splitlines()) < 130, out
    assert "... and 370 more changed tensors (every one: --json)" in out
    assert "... and 410 more changed modules (every one: --json)" in out  # (the reshaped ones too)
    assert "... and 10 more shape changes (every one: --json)" in out
    code, text, _ = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json")
    rep = json.loads(text)
    assert len(rep["changed"]) == 400 and len(rep["shape_changed"]) == 40
    assert sum(1 for m in rep["modules"] if m["changed"]) == 440


def test_nan_reported(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "a.pt")
    torch.save({"w": torch.tensor([1.0, float("nan"), 1.0])}, tmp_path / "b.pt")
    rep = cs.diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert rep["nonfinite"] == [{"name": "w", "b": {"nan": 1, "inf": 0}}]


def test_diff_errors_exit_2(tmp_path, cli):
    code, out, err = cli("diff", tmp_path / "missing.pt", tmp_path / "missing2.pt")
    assert code == 2 and err.count("\n") == 1 and "no such file" in err


def test_plot_needs_matplotlib_or_writes(sample_dir, tmp_path, cli):
    code, out, err = cli("diff", sample_dir / "seednet_resume.pt", sample_dir / "seednet_finetuned.pt",
                         "--plot", tmp_path / "c.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "matplotlib" in err
    else:
        assert code == 1 and (tmp_path / "c.png").stat().st_size > 1000


def test_diff_of_wrappers_holding_cycles(tmp_path, cli):
    """Pickles can hold cycles (a list inside itself): diff summarises them as "<cycle>" instead
    of recursing forever, and still sees what differs."""
    a, b = [], []
    a.append(a)
    b.append(b)
    b.append(2)
    d = {}
    d["self"] = d
    torch.save({"state_dict": {"w": torch.ones(2)}, "l": a, "d": d}, tmp_path / "a.pt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "l": b, "d": d}, tmp_path / "b.pt")
    code, out, err = cli("diff", tmp_path / "a.pt", tmp_path / "a.pt")
    assert code == 0 and "identical" in out, err
    code, out, err = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 1 and "root['l'][1]" in out, out + err


def test_large_or_self_similar_other_content_is_itemised_within_a_budget(tmp_path, cli):
    """deepdiff is handed what differs, within a budget: a loss history of 100,000 floats that
    changed (with 500 more steps) is itemised by its first differing and extra positions, with a
    note; an equal 50,000-entry mapping beside it costs nothing; a 2 KB "billion laughs" pickle
    (one dict shared by both slots of the next, forty levels) against its variant finishes with
    the difference found and a note that the rest was counted, not itemised (both took minutes)."""
    from ckptsurgeon.plugins.diff_content import LONG_LIST

    sd = {"w": torch.ones(3)}
    hist = [i / 7 for i in range(100_000)]
    vocab = {f"t{i}": i for i in range(50_000)}
    torch.save({"state_dict": sd, "history": hist, "epoch": 1, "vocab": vocab}, tmp_path / "a.pt")
    torch.save({"state_dict": sd, "history": [x + 1e-3 for x in hist] + [0.5] * 500, "epoch": 2, "vocab": vocab,
                "extra": list(range(5000))}, tmp_path / "b.pt")
    rep = cs.diff(tmp_path / "a.pt", tmp_path / "b.pt")
    meta = rep["metadata"]
    assert rep["differences"] and rep["verdict"] == "different: other content differs"
    changed = meta["values_changed"]
    assert changed["root['epoch']"] == {"new_value": 2, "old_value": 1}
    assert changed["root['history'][0]"] == {"new_value": 1e-3, "old_value": 0.0}
    assert len(changed) == LONG_LIST + 1 and f"root['history'][{LONG_LIST}]" not in changed
    added = meta["dictionary_item_added"]
    assert added["root['history'][100000]"] == 0.5 and len(added) == LONG_LIST + 1
    assert added["root['extra']"] == "<list of 5,000 items: not itemised>"
    assert not any("vocab" in k for kind in meta.values() for k in kind)
    assert any("root['history']: a list of 100,000 items against 100,500, 100,000 positions differ, 500 items "
               "on one side only" in n for n in rep["notes"])

    def laughs(leaf):
        d = leaf
        for _ in range(40):
            d = {"a": d, "b": d}
        return d

    torch.save({"state_dict": sd, "laughs": laughs({"w": 1})}, tmp_path / "l1.pt")
    torch.save({"state_dict": sd, "laughs": laughs({"w": 2})}, tmp_path / "l2.pt")
    code, out, err = cli("diff", tmp_path / "l1.pt", tmp_path / "l2.pt")
    assert code == 1 and "different: other content differs" in out, out + err
    assert "values_changed: root['laughs']['a']['a']" in out and "counted, not itemised" in out
    code, out, err = cli("diff", tmp_path / "l1.pt", tmp_path / "l1.pt")
    assert code == 0 and "identical" in out


def test_other_content_differences_are_itemised_as_they_are(tmp_path):
    """What deepdiff reports does not depend on what the budget left out: a mapping that shares
    one key of four with the other side lists the keys added and removed (deepdiff 8 called it one
    replaced value once the equal entries were left out), and a flag that became a number inside a
    list (True -> 1, equal in Python) is a type change, not a silent "differs"."""
    sd = {"w": torch.ones(2)}
    torch.save({"state_dict": sd, "cfg": {"same": 1, "a": 1, "b": 2}, "flags": [0, True]}, tmp_path / "a.pt")
    torch.save({"state_dict": sd, "cfg": {"same": 1, "c": 3, "d": 4}, "flags": [0, 1]}, tmp_path / "b.pt")
    meta = cs.diff(tmp_path / "a.pt", tmp_path / "b.pt")["metadata"]
    assert meta["dictionary_item_removed"] == {"root['cfg']['a']": 1, "root['cfg']['b']": 2}
    assert meta["dictionary_item_added"] == {"root['cfg']['c']": 3, "root['cfg']['d']": 4}
    assert meta["type_changes"]["root['flags'][1]"]["old_value"] is True
    assert meta["type_changes"]["root['flags'][1]"]["new_value"] == 1


def test_dtype_changes_report_how_much_the_values_moved(tmp_path, cli):
    """A float32 model against its bfloat16 copy: every tensor is a dtype change, and the report
    says how far the values moved (computed in float64 across the two dtypes), per tensor in JSON
    and as one line for a whole-model cast."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(16, 8) for i in range(5)}
    sd["step"] = torch.arange(4)
    sd["phase"] = torch.randn(3, dtype=torch.complex64)
    save_file(sd, tmp_path / "fp32.safetensors")
    low = {k: (v.bfloat16() if v.is_floating_point() else v.float() if k == "step" else v.real.contiguous()) for k, v in sd.items()}
    save_file(low, tmp_path / "bf16.safetensors")
    rep = cs.diff(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors")
    by_name = {e["name"]: e for e in rep["dtype_changed"]}
    assert set(by_name) == set(sd) and not rep["changed"]
    for i in range(5):
        e = by_name[f"layers.{i}.weight"]
        w = sd[f"layers.{i}.weight"].double()
        d = (w - low[f"layers.{i}.weight"].double()).abs()
        assert (e["a"], e["b"]) == ("float32", "bfloat16") and e["numel"] == 128
        assert e["max_abs"] == pytest.approx(float(d.max())) and e["n_diff"] == int((d > 0).sum())
        assert e["rel_l2"] == pytest.approx(float(d.norm() / w.norm())) and 0 < e["rel_l2"] < 0.01
    assert by_name["step"]["max_abs"] == 0 and by_name["step"]["n_diff"] == 0  # int64 -> float32: same values
    assert "max_abs" not in by_name["phase"]  # complex against real: not compared value by value
    assert all(m["rel_l2"] > 0 for m in rep["modules"] if m["module"] == "layers")
    code, out, _ = cli("diff", tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors")
    assert code == 1 and "dtype: 5 tensors float32 -> bfloat16; values: largest rel L2" in out
    assert "dtype: step: int64 -> float32 (max|a-b| 0, rel L2 0%)" in out and "dtype: phase: complex64 -> float32\n" in out


def test_diff_of_many_small_tensors_and_a_large_one(tmp_path, cli):
    """Thousands of small tensors (a mixture of experts has tens of thousands) are hashed inline
    through the file's mapping, large ones on two threads with pread: both find exactly the
    planted changes, and a damaged small record is still caught by its CRC."""
    import zipfile

    g = torch.Generator().manual_seed(3)
    a = OrderedDict((f"experts.{i // 4}.w{i % 4}", torch.randn(6, generator=g)) for i in range(3000))
    a["big.weight"] = torch.randn(600, 600, generator=g)  # 1.4 MB: past the inline-hash size
    b = OrderedDict((k, v.clone()) for k, v in a.items())
    b["experts.17.w2"][3] += 1e-3
    b["experts.700.w0"][0] = -b["experts.700.w0"][0]
    b["big.weight"][599, 599] += 0.5
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    rep = cs.diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert sorted(c["name"] for c in rep["changed"]) == ["big.weight", "experts.17.w2", "experts.700.w0"]
    assert rep["equal"] == 2998 and [c["n_diff"] for c in rep["changed"] if c["name"] == "big.weight"] == [1]
    # flip one byte inside a small record's data: the CRC check on the mapped read names it
    with zipfile.ZipFile(tmp_path / "b.pt") as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/5")))
    with open(tmp_path / "b.pt", "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    code, _, err = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 2 and "CRC-32 mismatch" in err and "data/5" in err and "Traceback" not in err


def test_other_content_under_double_underscore_names_is_compared(tmp_path, cli):
    """deepdiff skips names starting with '__' unless told not to: a safetensors header's
    metadata, a wrapper's '__version__' and the state dict's non-tensor entries all live under
    such names, and diff called files that differed only there 'identical'."""
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "m1.safetensors"), metadata={"step": "1"})
    save_file({"a": torch.ones(2)}, str(tmp_path / "m2.safetensors"), metadata={"step": "2"})
    torch.save({"state_dict": {"a": torch.ones(2)}, "__version__": 1}, tmp_path / "v1.pt")
    torch.save({"state_dict": {"a": torch.ones(2)}, "__version__": 2}, tmp_path / "v2.pt")
    torch.save({"a": torch.ones(2), "_extra": (torch.zeros(2), "x")}, tmp_path / "e1.pt")
    torch.save({"a": torch.ones(2), "_extra": (torch.ones(2), "x")}, tmp_path / "e2.pt")
    for a, b, path in [("m1.safetensors", "m2.safetensors", "root['__safetensors_metadata__']['step']"),
                       ("v1.pt", "v2.pt", "root['__version__']"),
                       ("e1.pt", "e2.pt", "root['__state_dict_non_tensor__']['_extra'][0]['xxh3']")]:
        rep = cs.diff(tmp_path / a, tmp_path / b)
        assert not rep["identical"] and rep["differences"], (a, rep["verdict"])
        assert path in rep["metadata"]["values_changed"], rep["metadata"]
        code, out, _ = cli("diff", tmp_path / a, tmp_path / b)
        assert code == 1 and "other content differs" in out
    assert cs.diff(tmp_path / "m1.safetensors", tmp_path / "m1.safetensors")["identical"]
    # header metadata where the other format has no place for it is not a difference, but said
    torch.save({"a": torch.ones(2)}, tmp_path / "a.pt")
    rep = cs.diff(tmp_path / "a.pt", tmp_path / "m2.safetensors")
    assert rep["identical"] and rep["notes"] == ["B's safetensors header metadata (step) not compared: "
                                                 "the other side's format has none"]


def test_diff_of_quantized_checkpoints(tmp_path, cli):
    """An eager-mode quantized model's state dict: qint8 weights (per channel), per-tensor
    quantized tensors, and a Linear's packed (weight, bias) tuple. diff refused ('a quantized
    tensor has no flat bytes'); now equal values hash equal, a changed weight gets statistics on
    the dequantized values, a scale change alone counts, and the packed tuple is compared."""
    import warnings

    warnings.simplefilter("ignore")
    w = torch.quantize_per_channel(torch.randn(8, 4), torch.rand(8, dtype=torch.float64) / 10 + 0.01,
                                   torch.zeros(8, dtype=torch.int64), 0, torch.qint8)
    t = torch.quantize_per_tensor(torch.randn(5), 0.1, 3, torch.quint8)
    base = OrderedDict([("conv.weight", w), ("q.act", t), ("fc._packed_params.dtype", torch.qint8),
                        ("fc._packed_params._packed_params", (w, torch.zeros(8)))])
    torch.save(base, tmp_path / "q.pt")
    same = OrderedDict(base)
    same["conv.weight"] = torch.quantize_per_channel(w.dequantize(), w.q_per_channel_scales(),
                                                     w.q_per_channel_zero_points(), 0, torch.qint8)
    torch.save(same, tmp_path / "q_same.pt")
    rep = cs.diff(tmp_path / "q.pt", tmp_path / "q_same.pt")
    assert rep["identical"], rep["verdict"]
    moved = OrderedDict(base)
    moved["conv.weight"] = torch.quantize_per_channel(w.dequantize() + 0.5, w.q_per_channel_scales(),
                                                      w.q_per_channel_zero_points(), 0, torch.qint8)
    moved["q.act"] = torch._make_per_tensor_quantized_tensor(t.int_repr(), 0.2, 3)  # same integers, new scale
    moved["fc._packed_params._packed_params"] = (moved["conv.weight"], torch.zeros(8))
    torch.save(moved, tmp_path / "q_moved.pt")
    rep = cs.diff(tmp_path / "q.pt", tmp_path / "q_moved.pt")
    changed = {c["name"]: c for c in rep["changed"]}
    assert set(changed) == {"conv.weight", "q.act"}
    assert changed["conv.weight"]["max_abs"] == pytest.approx(0.5, abs=0.12)
    assert changed["q.act"]["max_abs"] > 0
    assert any("_packed_params" in p for p in rep["metadata"]["values_changed"])
    code, out, err = cli("diff", tmp_path / "q.pt", tmp_path / "q_moved.pt")
    assert code == 1 and "Traceback" not in err
    # torch's own deprecation of the quantized constructors it calls to rebuild them is not the user's
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "ckptsurgeon", "diff", str(tmp_path / "q.pt"), str(tmp_path / "q_moved.pt")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "warning" not in run.stderr, run.stderr
    # the DataParallel copy: its packed tuple and dtype entry are compared under the aligned names
    torch.save(OrderedDict((f"module.{k}", v) for k, v in base.items()), tmp_path / "q_dp.pt")
    code, out, err = cli("diff", tmp_path / "q_dp.pt", tmp_path / "q.pt")
    assert code == 0 and "identical" in out, out + err
    rep = cs.diff(tmp_path / "q_dp.pt", tmp_path / "q_moved.pt")
    assert list(rep["metadata"]["values_changed"]) and all("module." not in p for p in rep["metadata"]["values_changed"])


def test_a_negative_or_nan_tolerance_is_refused(sample_dir, cli):
    for cmd in (["diff"], ["verify", "--model", "samples/models.py:seednet"]):
        for opt, val in (("--atol", "-1"), ("--rtol", "nan")):
            code, _, err = cli(*cmd, sample_dir / "seednet.pt", sample_dir / "seednet.pt", opt, val)
            assert code == 2 and f"{opt} {float(val)} must be 0 or more" in err, err


def test_two_files_without_a_model_state_dict_are_compared_as_wholes(sample_dir, tmp_path, cli):
    """Two optimizer (or scheduler) files: every tensor by hash at its place, with the rest (it
    was an error: "choose one with --key"); one such file against a model's checkpoint stays an
    error, and so does an explicit --key that names nothing."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o1.pt")
    torch.save(opt.state_dict(), tmp_path / "o1_again.pt")
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o2.pt")
    code, out, err = cli("diff", tmp_path / "o1.pt", tmp_path / "o1_again.pt")
    assert code == 0 and "identical" in out and "compared as a whole" in out, out + err
    code, out, err = cli("diff", tmp_path / "o1.pt", tmp_path / "o2.pt", "--json")
    assert code == 1, err
    rep = json.loads(out)
    changed = set(rep["metadata"]["values_changed"])
    assert "root['state'][0]['exp_avg']['xxh3']" in changed and "root['state'][1]['exp_avg_sq']['xxh3']" in changed
    assert rep["notes"][0].startswith("A: an optimizer's state dict (torch.optim), not a model's: 2 parameter states")
    rep = cs.diff(str(tmp_path / "o1.pt"), str(tmp_path / "o2.pt"))  # the API alike
    assert rep["differences"] and "compared as a whole" in rep["notes"][1]
    code, out, err = cli("diff", tmp_path / "o1.pt", tmp_path / "o2.pt", "--tensors-only")
    assert code == 1 and "--tensors-only does not apply" in out, out + err  # never a vacuous "identical"
    code, _, err = cli("diff", tmp_path / "o1.pt", sample_dir / "seednet.pt")
    assert code == 2 and "an optimizer's state dict" in err and err.count("\n") == 1
    code, _, err = cli("diff", tmp_path / "o1.pt", tmp_path / "o2.pt", "--key-a", "nothing")
    assert code == 2 and "is not in the checkpoint" in err


def test_report_written_to_a_file_keeps_long_tensor_names_whole(tmp_path, cli, monkeypatch):
    """Piped or redirected (`diff a b > report.txt`), the tables are as wide as they need: rich's
    default of 80 columns cut every name to `model.encoder.layers.0.self_…`. A narrow terminal
    (COLUMNS) wraps the name rather than cutting it."""
    monkeypatch.delenv("COLUMNS", raising=False)
    name = "model.encoder.layers.0.self_attention.query_key_value_projection.lora_adapter_B.weight"
    torch.save({name: torch.ones(4), "b": torch.ones(2)}, tmp_path / "a.pt")
    torch.save({name: torch.full((4,), 2.0), "b": torch.ones(2)}, tmp_path / "b.pt")
    code, out, err = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 1 and name in out and "…" not in out
    monkeypatch.setenv("COLUMNS", "70")
    code, out, err = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    table = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert code == 1 and table and max(len(line) for line in table) <= 70
    assert name in "".join(line.split("│")[1].strip() for line in out.splitlines() if line.count("│") == 7)


def test_a_tied_name_one_side_stores_once_is_compared_through_its_partner(tmp_path, cli):
    """A .bin holds lm_head.weight as a second name of the embedding; save_pretrained's safetensors
    leaves it out. Before, diff called the two files different ("only in A: lm_head.weight")."""
    from safetensors.torch import save_file

    emb = torch.randn(10, 4)
    torch.save({"model.embed.weight": emb, "lm_head.weight": emb, "x.w": torch.ones(2)}, tmp_path / "tied.bin")
    save_file({"model.embed.weight": emb.clone(), "x.w": torch.ones(2)}, tmp_path / "st.safetensors")
    rep = cs.diff(tmp_path / "tied.bin", tmp_path / "st.safetensors")
    assert rep["identical"] and not rep["only_in_a"], rep["verdict"]
    assert rep["tied_only_in_a"] == [{"name": "lm_head.weight", "tied_to": "model.embed.weight"}]
    code, out, _ = cli("diff", tmp_path / "st.safetensors", tmp_path / "tied.bin")
    assert code == 0 and "tied in B, stored once in A (1): lm_head.weight = model.embed.weight" in out
    # the partner changed: a difference, reported on the partner
    save_file({"model.embed.weight": emb + 1, "x.w": torch.ones(2)}, tmp_path / "st2.safetensors")
    rep = cs.diff(tmp_path / "tied.bin", tmp_path / "st2.safetensors")
    assert not rep["identical"] and [c["name"] for c in rep["changed"]] == ["model.embed.weight"]
    # a name only in A that is not tied stays "only in A"; so does a tied pair B lacks entirely
    torch.save({"model.embed.weight": emb, "lm_head.weight": emb.clone(), "x.w": torch.ones(2)}, tmp_path / "untied.bin")
    rep = cs.diff(tmp_path / "untied.bin", tmp_path / "st.safetensors")
    assert rep["only_in_a"] == ["lm_head.weight"] and not rep["tied_only_in_a"]
    # ... but the copy is named as holding its partner's values (not when the values differ)
    assert rep["copies_only_in_a"] == [{"name": "lm_head.weight", "same_as": "model.embed.weight"}], rep
    code, out, _ = cli("diff", tmp_path / "untied.bin", tmp_path / "st.safetensors")
    assert code == 1 and "lm_head.weight (only in A) holds the same values as model.embed.weight" in out, out
    torch.save({"model.embed.weight": emb, "lm_head.weight": emb + 1, "x.w": torch.ones(2)}, tmp_path / "other.bin")
    assert cs.diff(tmp_path / "other.bin", tmp_path / "st.safetensors")["copies_only_in_a"] == []
    save_file({"x.w": torch.ones(2)}, tmp_path / "x.safetensors")
    rep = cs.diff(tmp_path / "tied.bin", tmp_path / "x.safetensors")
    assert rep["only_in_a"] == ["model.embed.weight", "lm_head.weight"] and not rep["tied_only_in_a"]


def test_tensors_only_compares_the_weights_alone(tmp_path, cli):
    """A Lightning checkpoint against the weights taken out of it: the wrapper (epoch, optimizer,
    hyper-parameters) exists on one side only, so diff says 'different' (exit 1), as it should.
    --tensors-only asks only whether the weights are the same: exit 0; a changed weight is still
    found."""
    sd = OrderedDict([("model.fc.weight", torch.randn(3, 2)), ("model.fc.bias", torch.randn(3))])
    torch.save({"state_dict": sd, "epoch": 4, "hyper_parameters": {"lr": 0.1}}, tmp_path / "last.ckpt")
    code, _, err = cli("strip-prefix", tmp_path / "last.ckpt", "--state-dict-only", "-o", tmp_path / "w.safetensors")
    assert code == 0, err
    code, out, _ = cli("diff", tmp_path / "last.ckpt", tmp_path / "w.safetensors")
    assert code == 1 and "other content differs" in out
    code, out, err = cli("diff", tmp_path / "last.ckpt", tmp_path / "w.safetensors", "--tensors-only")
    assert code == 0 and "identical: every tensor is bitwise equal\n" in out and "--tensors-only" in out, out + err
    changed = OrderedDict(sd, **{"model.fc.bias": sd["model.fc.bias"] + 1})
    torch.save({"state_dict": changed, "epoch": 4}, tmp_path / "other.ckpt")
    rep = cs.diff(tmp_path / "other.ckpt", tmp_path / "w.safetensors", tensors_only=True)
    assert rep["differences"] and [c["name"] for c in rep["changed"]] == ["fc.bias"] and not rep["metadata"]
