"""Checkpoints written by Lightning itself (tests/data/lightning, made by
tests/data/make_lightning.py with Lightning 2.6.6: ModelCheckpoint, EarlyStopping,
LearningRateMonitor, Adam + StepLR, BatchNorm; one with an OmegaConf hyperparameter)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import ckptsurgeon as cs

DATA = Path(__file__).resolve().parent / "data" / "lightning"


def _plain(o, seen=None):
    """An inert graph as plain nested data, to compare two of them by content (OmegaConf nodes
    point back at their parents: a node met again is its first-visit number)."""
    from ckptsurgeon.inert import GlobalRef, InertObject

    seen = {} if seen is None else seen
    if isinstance(o, (InertObject, dict, list)):
        if id(o) in seen:
            return ("<again>", seen[id(o)])
        seen[id(o)] = len(seen)
    if isinstance(o, InertObject):
        rec = o._inert
        return (type(o).__qualname__,) + tuple(_plain(rec[k], seen) for k in ("args", "state", "items", "dictitems"))
    if isinstance(o, type) or isinstance(o, GlobalRef):
        return getattr(o, "qualname", None) or o.__qualname__
    if isinstance(o, dict):
        return {k: _plain(v, seen) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v, seen) for v in o]
    return o


def _pickle(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def test_lightning_checkpoint_reads_by_default_and_rewrites_for_lightning(tmp_path, cli):
    module_sd = torch.load(DATA / "plain.state_dict.pt", weights_only=True)
    ck = cs.load(DATA / "plain.ckpt")
    assert ck.source.lazy and ck.sd_path == ("state_dict",) and list(ck.state) == list(module_sd)
    assert all(torch.equal(ck.state[k].to_torch(), v) for k, v in module_sd.items())
    # callbacks' state (ModelCheckpoint's best_k_models maps checkpoint paths to score tensors) is
    # no state dict: not even listed as a candidate
    assert ck.candidates == ("state_dict",), ck.candidates
    cs.save(ck, tmp_path / "same.ckpt")
    assert _pickle(tmp_path / "same.ckpt") == _pickle(DATA / "plain.ckpt")  # unchanged: the same pickle

    code, _, err = cli("strip-prefix", DATA / "plain.ckpt", "-o", tmp_path / "stripped.ckpt")
    assert code == 0, err
    out = torch.load(tmp_path / "stripped.ckpt", weights_only=True)
    assert list(out["state_dict"]) == [k[len("model."):] for k in module_sd]
    original = torch.load(DATA / "plain.ckpt", weights_only=True)
    for key in ("epoch", "global_step", "loops", "callbacks", "lr_schedulers", "hyper_parameters"):
        assert repr(out[key]) == repr(original[key]), key
    assert torch.equal(out["optimizer_states"][0]["state"][0]["exp_avg"],
                       original["optimizer_states"][0]["state"][0]["exp_avg"])
    code, _, err = cli("convert", DATA / "plain.ckpt", "-o", tmp_path / "m.safetensors")
    assert code == 0 and set(load_file(tmp_path / "m.safetensors")) == set(module_sd), err


def test_omegaconf_hyperparameters_are_refused_or_read_inert(tmp_path, cli):
    """Hydra users' checkpoints pickle OmegaConf objects: torch.load(weights_only=True) refuses
    them, and so does the default here (naming the classes); --inert-pickle records them,
    imports nothing, and carries them into the output unchanged."""
    code, _, err = cli("inspect", DATA / "omegaconf.ckpt")
    assert code == 2 and "omegaconf.dictconfig.DictConfig" in err and "--inert-pickle" in err
    assert len(err.strip().splitlines()) == 1
    ck = cs.load(DATA / "omegaconf.ckpt", trust_pickle="inert")
    cfg = ck.wrapper["hyper_parameters"]["cfg"]
    assert type(cfg).__qualname__ == "omegaconf.dictconfig.DictConfig"  # an inert record, not the class
    code, _, err = cli("strip-prefix", "--inert-pickle", DATA / "omegaconf.ckpt", "-o", tmp_path / "s.ckpt")
    assert code == 0, err
    again = cs.load(tmp_path / "s.ckpt", trust_pickle="inert")
    assert list(again.state) == [k[len("model."):] for k in ck.state]
    before, after = _plain(ck.wrapper["hyper_parameters"]), _plain(again.wrapper["hyper_parameters"])
    assert after == before and "/data" in repr(before)  # the DictConfig's content, record for record
    code, out, _ = cli("scan", tmp_path / "s.ckpt")
    assert code == 1 and "omegaconf.dictconfig.DictConfig" in out  # as unsafe for torch.load as the input


def test_state_dict_only_writes_what_load_state_dict_expects(tmp_path, cli):
    """The everyday export: a Lightning checkpoint -> a plain state dict .pt (prefix stripped)
    that model.load_state_dict(torch.load(f)) takes; the wrapper entries are named as not
    written. Also through the API, on a DDP resume dict."""
    src = Path(__file__).parent / "data" / "lightning" / "plain.ckpt"
    code, out, err = cli("strip-prefix", src, "-o", tmp_path / "weights.pt", "--state-dict-only")
    assert code == 0, err
    assert "not written (epoch, global_step" in out and "state_dict," not in out
    sd = torch.load(tmp_path / "weights.pt", weights_only=True)
    full = torch.load(src, weights_only=True)["state_dict"]
    assert list(sd) == [k[len("model."):] for k in full]
    assert all(torch.equal(sd[k[len("model."):]], v) for k, v in full.items())
    assert hasattr(sd, "_metadata")  # module versions kept, as torch.save(model.state_dict()) has them
    torch.save({"epoch": 2, "model_state_dict": {"module.w": torch.ones(2)}, "optimizer_state_dict": {}},
               tmp_path / "resume.pt")
    new, _ = cs.strip_prefix(cs.load(tmp_path / "resume.pt"))
    rep = cs.save(new, tmp_path / "w.pt", state_dict_only=True)
    assert torch.load(tmp_path / "w.pt", weights_only=True).keys() == {"w"}
    assert "epoch, optimizer_state_dict" in rep["notes"][0]
