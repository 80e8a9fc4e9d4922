"""average: the (weighted) mean of several checkpoints of one model, tensor by tensor."""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
from safetensors.torch import load_file, save_file

import ckptsurgeon as cs


def _run(seed):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("enc.weight", torch.randn(6, 4, generator=g)), ("enc.bias", torch.randn(6, generator=g)),
                        ("bn.running_var", torch.rand(6, generator=g)), ("bn.num_batches_tracked", torch.tensor(10)),
                        ("head.weight", torch.randn(3, 6, generator=g).bfloat16())])


def test_mean_of_three_runs_equals_torch(tmp_path, cli, same):
    runs = [_run(s) for s in range(3)]
    for i, sd in enumerate(runs):
        save_file(sd, tmp_path / f"r{i}.safetensors")
    code, out, err = cli("average", *(tmp_path / f"r{i}.safetensors" for i in range(3)), "-o", tmp_path / "avg.safetensors")
    assert code == 0 and "averaged 4 tensors over 3 checkpoints" in out and "kept 1 tensor from the first as it was" in out, err
    got = load_file(tmp_path / "avg.safetensors")
    for k in ("enc.weight", "enc.bias", "bn.running_var", "head.weight"):
        mean = sum(sd[k].double() for sd in runs) / 3
        assert got[k].dtype == runs[0][k].dtype and torch.equal(got[k], mean.to(runs[0][k].dtype)), k
    assert torch.equal(got["bn.num_batches_tracked"], torch.tensor(10))

    # weights (relative), an input written with DataParallel's prefix, a differing integer buffer
    dp = OrderedDict(("module." + k, v) for k, v in runs[1].items())
    dp["module.bn.num_batches_tracked"] = torch.tensor(99)
    torch.save(dp, tmp_path / "r1_dp.pt")
    torch.save(runs[0], tmp_path / "r0.pt")
    code, out, err = cli("average", tmp_path / "r0.pt", tmp_path / "r1_dp.pt", "--weights", "3,1", "-o",
                         tmp_path / "w.pt", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["weights"] == [0.75, 0.25]
    assert any("bn.num_batches_tracked" in n and "first one's kept" in n for n in rep["notes"])
    assert any("aligned keys" in n for n in rep["notes"])
    w = torch.load(tmp_path / "w.pt", weights_only=True)
    assert list(w) == list(runs[0])  # the first checkpoint's keys and layout
    expected = (0.75 * runs[0]["enc.weight"].double() + 0.25 * runs[1]["enc.weight"].double()).float()
    assert torch.equal(w["enc.weight"], expected) and w["bn.num_batches_tracked"] == 10


def test_average_keeps_ties_and_the_first_wrapper(tmp_path):
    emb_a, emb_b = torch.randn(5, 3), torch.randn(5, 3)
    for name, emb in (("a", emb_a), ("b", emb_b)):
        torch.save({"epoch": 1 if name == "a" else 2,
                    "model": OrderedDict([("wte.weight", emb), ("lm_head.weight", emb)])}, tmp_path / f"{name}.pt")
    soup, rep = cs.average([cs.load(tmp_path / "a.pt"), cs.load(tmp_path / "b.pt")])
    cs.save(soup, tmp_path / "soup.pt")
    out = torch.load(tmp_path / "soup.pt", weights_only=True)
    assert out["epoch"] == 1 and any("wrapper content" in n for n in rep["notes"])
    m = out["model"]
    assert torch.equal(m["wte.weight"], ((emb_a.double() + emb_b.double()) / 2).float())
    assert m["lm_head.weight"].data_ptr() == m["wte.weight"].data_ptr()


def test_average_refuses_what_is_not_one_model(tmp_path, cli):
    a, b = _run(0), _run(1)
    save_file(a, tmp_path / "a.safetensors")
    del b["enc.bias"]
    save_file(b, tmp_path / "b.safetensors")
    code, _, err = cli("average", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "checkpoint 2 has other tensors than the first: 1 missing" in err
    c = _run(2)
    c["enc.weight"] = torch.randn(4, 6)
    save_file(c, tmp_path / "c.safetensors")
    code, _, err = cli("average", tmp_path / "a.safetensors", tmp_path / "c.safetensors", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "enc.weight: shapes differ" in err
    code, _, err = cli("average", tmp_path / "a.safetensors", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "at least two" in err
    code, _, err = cli("average", tmp_path / "a.safetensors", tmp_path / "a.safetensors", "--weights", "1,x",
                       "-o", tmp_path / "o.safetensors")
    assert code == 2 and "--weights" in err
    for weights in ("nan,1", "inf,1", "1,-1", "0,0"):  # a NaN weight wrote NaN tensors, exit 0
        code, _, err = cli("average", tmp_path / "a.safetensors", tmp_path / "a.safetensors", "--weights", weights,
                           "-o", tmp_path / "o.safetensors")
        assert code == 2 and "weights must be" in err and len(err.strip().splitlines()) == 1, err
    save_file(_run(3), tmp_path / "d.safetensors")
    code, _, err = cli("average", tmp_path / "a.safetensors", tmp_path / "d.safetensors", "-o", tmp_path / "d.safetensors")
    assert code == 2 and "refusing to overwrite the input" in err  # the second input too, not just the first
    assert not (tmp_path / "o.safetensors").exists()


def test_a_tie_of_the_first_checkpoint_is_kept_only_where_all_agree(tmp_path):
    """An embedding tied to its LM head (one storage) in the first checkpoint: the mean was
    written once and shared, so when another checkpoint holds the two differently the head got
    the embedding's mean, silently. Now each gets its own mean there (with a note); where every
    checkpoint holds them equal, the output keeps them tied."""
    t = torch.zeros(2, 2)
    torch.save({"emb": t, "head": t}, tmp_path / "a.pt")
    torch.save({"emb": t + 1, "head": t + 2}, tmp_path / "b.pt")
    torch.save({"emb": t + 4, "head": t + 4}, tmp_path / "c.pt")  # equal, but two storages
    soup, rep = cs.average([cs.load(tmp_path / "a.pt"), cs.load(tmp_path / "b.pt")])
    cs.save(soup, tmp_path / "ab.pt")
    got = torch.load(tmp_path / "ab.pt", weights_only=True)
    assert got["emb"].eq(0.5).all() and got["head"].eq(1.0).all()
    assert any("no longer tied" in n for n in rep["notes"])
    soup, rep = cs.average([cs.load(tmp_path / "a.pt"), cs.load(tmp_path / "c.pt")])
    cs.save(soup, tmp_path / "ac.pt")
    got = torch.load(tmp_path / "ac.pt", weights_only=True)
    assert got["emb"].eq(2.0).all() and got["emb"].data_ptr() == got["head"].data_ptr()
    assert not any("tied" in n for n in rep["notes"])


def test_average_keeps_a_float8_weight_and_its_scale_together(tmp_path):
    """float8 codes are not averaged (the first's are kept); their scale was averaged anyway, so the
    output paired the first's codes with a mean scale. The scale now goes with its codes."""
    a = {"m.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "m.weight_scale_inv": torch.ones(1),
         "n.weight": torch.ones(2)}
    b = {"m.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "m.weight_scale_inv": torch.ones(1) * 3,
         "n.weight": torch.ones(2) * 3}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    soup, rep = cs.average([cs.load(tmp_path / "a.safetensors"), cs.load(tmp_path / "b.safetensors")])
    cs.save(soup, tmp_path / "s.safetensors")
    got = load_file(tmp_path / "s.safetensors")
    assert torch.equal(got["m.weight_scale_inv"], a["m.weight_scale_inv"])
    assert torch.equal(got["m.weight"].view(torch.uint8), a["m.weight"].view(torch.uint8))
    assert torch.equal(got["n.weight"], torch.full((2,), 2.0))
    assert any("m.weight_scale_inv" in n for n in rep["notes"])


def test_a_sparse_tensor_is_kept_from_the_first_not_averaged(tmp_path, cli):
    """A sparse COO weight (read through torch.load) is not averaged: the first checkpoint's is
    kept, with a note where they differ (it was an internal error: "unsupported memory format")."""
    torch.manual_seed(0)
    w = [torch.randn(3, 3) for _ in range(2)]
    for i in range(2):
        torch.save({"w": w[i], "s": (torch.randn(3, 3) + i).to_sparse()}, tmp_path / f"{i}.pt")
    code, out, err = cli("average", tmp_path / "0.pt", tmp_path / "1.pt", "-o", tmp_path / "avg.pt")
    assert code == 0, err
    assert "note: s (a sparse_coo float32 tensor, not averaged) differs across the checkpoints: the first one's kept" \
        in out
    avg = torch.load(tmp_path / "avg.pt", weights_only=True)
    first = torch.load(tmp_path / "0.pt", weights_only=True)
    assert torch.equal(avg["s"].to_dense(), first["s"].to_dense())
    assert torch.allclose(avg["w"], (w[0] + w[1]) / 2)
