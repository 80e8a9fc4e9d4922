"""bn-to-gn, fold-bn and verify on models with non-trivial statistics."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import ckptsurgeon as cs
from ckptsurgeon.errors import ModelError, SelectionError


def test_choose_groups_policies():
    from ckptsurgeon.plugins.norm import choose_groups

    assert choose_groups(64, 32, "strict") == 32
    assert choose_groups(48, 32, "nearest") == 24
    assert choose_groups(100, 32, "nearest") == 25
    assert choose_groups(7, 32, "nearest") == 7
    with pytest.raises(SelectionError, match="layer bn4 has 48 channels"):
        choose_groups(48, 32, "strict", "bn4")


def test_bn_to_gn_numbers_checked_first(sample_dir, cli, models_py):
    # before: --groups 0 lost to a key-reading question, --calibrate -5 built a tensor of size -5
    for extra, msg in ((["--groups", "0"], "--groups must be positive"),
                       (["--groups", "8", "--calibrate", "-5", "--model", f"{models_py}:bnnet"], "--calibrate -5")):
        code, _, err = cli("bn-to-gn", sample_dir / "bnnet.pt", "-o", sample_dir / "never.pt", *extra)
        assert code == 2 and msg in err and not (sample_dir / "never.pt").exists(), err


def test_swap_bn_for_gn_model(models):
    net = models.randomize_norm_stats(models.seednet(), seed=4)
    replaced = cs.swap_bn_for_gn(net, groups=32, policy="nearest")
    assert [r["layer"] for r in replaced] == ["bn1", "bn4"]
    assert isinstance(net.bn1, nn.GroupNorm) and net.bn4.num_groups == 24
    assert isinstance(net.in2, nn.InstanceNorm2d)  # never converted
    nested = nn.Sequential(nn.Sequential(nn.BatchNorm2d(8), nn.BatchNorm2d(8)), nn.BatchNorm1d(4))
    assert len(cs.swap_bn_for_gn(nested, groups=4)) == 3
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in nested.modules())


def test_bn_to_gn_checkpoint_only_loads_strictly(sample_dir, tmp_path, models):
    ck = cs.load(sample_dir / "seednet_dp.pt")
    new, rep = cs.bn_to_gn(ck, groups=32, policy="nearest")
    assert [(l["layer"], l["groups"]) for l in rep["layers"]] == [("bn1", 16), ("bn4", 24)]
    assert "module.bn1.running_mean" not in new.state and "module.in2.running_mean" in new.state
    cs.save(new, tmp_path / "gn.pt")
    net = models.seednet()
    cs.swap_bn_for_gn(net, groups=32, policy="nearest")
    sd = torch.load(tmp_path / "gn.pt", weights_only=True)
    net.load_state_dict({k[len("module."):]: v for k, v in sd.items()}, strict=True)
    with pytest.raises(SelectionError, match="layer bn1 has 16 channels, not divisible by 32"):
        cs.bn_to_gn(ck, groups=32, policy="strict")
    with pytest.raises(SelectionError, match="layer bn4 has 48 channels"):
        cs.bn_to_gn(ck, groups=32, policy="strict", layers=["bn4"])


def test_tracked_instancenorm_ambiguity(tmp_path, models):
    class Amb(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.n1 = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
            self.n2 = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.n2(self.n1(self.conv(x)))

    torch.save(models.randomize_norm_stats(Amb()).state_dict(), tmp_path / "amb.pt")
    ck = cs.load(tmp_path / "amb.pt")
    with pytest.raises(SelectionError, match="cannot tell BatchNorm from InstanceNorm"):
        cs.bn_to_gn(ck, groups=4)
    new, rep = cs.bn_to_gn(ck, groups=4, model=Amb())
    assert [l["layer"] for l in rep["layers"]] == ["n2"]
    assert "n1.running_mean" in new.state
    new, rep = cs.bn_to_gn(ck, groups=4, layers=["n2"])
    assert [l["layer"] for l in rep["layers"]] == ["n2"]


def test_calibration_reduces_error(sample_dir, models):
    ck = cs.load(sample_dir / "seednet.pt")
    _, plain = cs.bn_to_gn(ck, groups=32, policy="nearest", model=models.seednet(), input_shape=(3, 16, 16))
    new, cal = cs.bn_to_gn(ck, groups=32, policy="nearest", model=models.seednet(), calibrate=64,
                           input_shape=(3, 16, 16))
    assert cal["calibrated"] and cal["error_plain"] == pytest.approx(plain["error_plain"])
    assert cal["error_calibrated"] < 0.5 * cal["error_plain"]
    assert cal["error_plain"] > 0.05  # default statistics would hide this; ours are randomised


def test_fold_bn_equivalent_and_verify(sample_dir, tmp_path, models, models_py, cli):
    ck = cs.load(sample_dir / "bnnet.pt")
    new, rep = cs.fold_bn(ck, models.bnnet())
    assert [(p["layer"], p["bn"]) for p in rep["folded"]] == [
        ("stem.0", "stem.1"), ("block.0", "block.1"), ("block.3", "block.4"), ("fc1", "bn_fc")]
    assert rep["method"] == "torch.fx graph"
    cs.save(new, tmp_path / "folded.pt")
    code, out, err = cli("verify", sample_dir / "bnnet.pt", tmp_path / "folded.pt", "--model", f"{models_py}:bnnet",
                         "--json")
    r = json.loads(out)
    assert code == 0 and r["equivalent"] and r["transforms_b"] == ["fold-bn"] and r["first_divergent"] is None
    assert r["outputs"][0]["max_abs"] < 1e-4


def test_fold_bn_skips_bn_not_after_conv(tmp_path, models):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn_pre = nn.BatchNorm2d(3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(self.bn_pre(x)))

    net = models.randomize_norm_stats(Net()).eval()
    torch.save(net.state_dict(), tmp_path / "n.pt")
    new, rep = cs.fold_bn(cs.load(tmp_path / "n.pt"), Net())
    assert [p["bn"] for p in rep["folded"]] == ["bn"]
    assert rep["skipped"] == [{"bn": "bn_pre", "reason": "does not directly follow a conv/linear"}]


def test_verify_after_key_surgery(sample_dir, tmp_path, models_py, cli):
    m = f"{models_py}:seednet"
    cs.save(cs.strip_prefix(cs.load(sample_dir / "seednet_dp.pt"))[0], tmp_path / "s.pt")
    cs.save(cs.rename(cs.load(tmp_path / "s.pt"), [("^fc", "fc")])[0], tmp_path / "r.safetensors")
    for a, b in [(sample_dir / "seednet_dp.pt", tmp_path / "s.pt"), (sample_dir / "seednet_lightning.ckpt", tmp_path / "r.safetensors"),
                 (sample_dir / "seednet_compiled.pt", sample_dir / "seednet_hf")]:
        r = cs.verify(a, b, model=m, device="auto")
        assert r["equivalent"] and r["device"] == ("cuda" if torch.cuda.is_available() else "cpu"), (a, b)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: legacy flags only")
@pytest.mark.parametrize("setup", ["default", "legacy", "new", "mixed"])
def test_verify_turns_tf32_off_through_either_api_and_restores_it(setup, sample_dir, models_py):
    """torch >= 2.9 raises when the legacy and the per-backend TF32 APIs disagree: verify must work
    whichever one the caller (or the model's own module) used, and leave the settings as found."""
    import importlib

    verify_mod = importlib.import_module("ckptsurgeon.plugins.verify_numerics")
    get, put = verify_mod.precision_api()

    def state():
        return [get(b, o) for b, o in verify_mod.PRECISION_SLOTS], verify_mod.legacy_flags()

    before = state()
    try:
        if setup == "legacy":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("medium")
        elif setup in ("new", "mixed"):
            torch.backends.fp32_precision = "tf32"
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
            if setup == "mixed":
                torch.backends.cudnn.allow_tf32 = False
        set_up = state()
        inside = []
        with verify_mod.no_tf32():
            inside.append(state())
        assert inside[0][1] == ("highest", False)
        assert all(v == "ieee" for (b, o), v in zip(verify_mod.PRECISION_SLOTS, inside[0][0]) if o != "all")
        r = cs.verify(sample_dir / "seednet_dp.pt", sample_dir / "seednet_dp.pt", model=f"{models_py}:seednet")
        assert r["equivalent"]
        assert state() == set_up
    finally:
        for (b, o), v in zip(verify_mod.PRECISION_SLOTS, before[0]):
            put(b, o, v)
        if before[1] is not None:
            torch.set_float32_matmul_precision(before[1][0])
            torch.backends.cudnn.allow_tf32 = before[1][1]
            for (b, o), v in zip(verify_mod.PRECISION_SLOTS, before[0]):
                put(b, o, v)
    assert state() == before


def test_verify_extract_reroot(tmp_path, models):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = models.bnnet()

    torch.save(models.randomize_norm_stats(Net()).state_dict(), tmp_path / "full.pt")
    new, _ = cs.extract(cs.load(tmp_path / "full.pt"), ["backbone"], reroot="backbone")
    cs.save(new, tmp_path / "bb.pt")
    ref = Net().backbone
    cs.load_partial(ref, tmp_path / "full.pt", min_match=1.0)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    assert cs.verify(tmp_path / "ref.pt", tmp_path / "bb.pt", model=models.bnnet)["equivalent"]


def test_verify_names_planted_layer(sample_dir, tmp_path, models_py, cli):
    sd = torch.load(sample_dir / "seednet.pt", weights_only=True)
    sd["conv3.weight"] = sd["conv3.weight"] * 1.01
    torch.save(sd, tmp_path / "bad.pt")
    code, out, err = cli("verify", sample_dir / "seednet.pt", tmp_path / "bad.pt", "--model", f"{models_py}:seednet",
                         "--json")
    r = json.loads(out)
    assert code == 1 and not r["equivalent"] and r["first_divergent"] == "conv3"
    ok = [m["module"] for m in r["modules"] if m["ok"]]
    assert ok[:4] == ["conv1", "bn1", "conv2", "in2"]


def test_verify_bn_to_gn_reports_divergence(sample_dir, tmp_path, models_py, cli):
    new, _ = cs.bn_to_gn(cs.load(sample_dir / "seednet.pt"), groups=32, policy="nearest")
    cs.save(new, tmp_path / "gn.safetensors")
    code, out, err = cli("verify", sample_dir / "seednet.pt", tmp_path / "gn.safetensors", "--model",
                         f"{models_py}:seednet", "--json")
    r = json.loads(out)
    assert code == 1 and r["transforms_b"] == ["bn-to-gn"] and r["first_divergent"] == "bn1"
    assert r["notes"] and r["outputs"][0]["max_abs"] > 0


def test_verify_of_a_cast_names_the_dtype_to_check_it_in(sample_dir, tmp_path, models_py):
    """A bfloat16 cast rounds every weight: at float32's tolerance it is not equivalent, and the
    report says which --dtype checks the function within the cast's precision (which passes)."""
    new, _ = cs.cast(cs.load(sample_dir / "seednet.pt"), "bfloat16")
    cs.save(new, tmp_path / "bf16.safetensors")
    r = cs.verify(sample_dir / "seednet.pt", tmp_path / "bf16.safetensors", model=f"{models_py}:seednet")
    assert not r["equivalent"] and any("--dtype bfloat16 checks the function" in n for n in r["notes"]), r["notes"]
    r = cs.verify(sample_dir / "seednet.pt", tmp_path / "bf16.safetensors", model=f"{models_py}:seednet",
                  dtype="bfloat16")
    assert r["equivalent"] and not any("--dtype" in n for n in r["notes"])
    same = cs.verify(sample_dir / "seednet.pt", sample_dir / "seednet.safetensors", model=f"{models_py}:seednet")
    assert same["equivalent"] and not same["notes"]


def test_verify_dtype_and_device_errors(sample_dir, models_py, cli):
    r = cs.verify(sample_dir / "seednet.pt", sample_dir / "seednet.safetensors", model=f"{models_py}:seednet",
                  dtype="bfloat16")
    assert r["equivalent"] and "0.05" in r["outputs"][0]["rule"]
    for bad in ("int8", "bool", "nonsense"):  # int8 was an internal error from nn.Module.to
        code, out, err = cli("verify", sample_dir / "seednet.pt", sample_dir / "seednet.pt", "--model",
                             f"{models_py}:seednet", "--dtype", bad)
        assert code == 2 and f"'--dtype': '{bad}' is not one of" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SelectionError, match="verify runs models in"):
        cs.verify(sample_dir / "seednet.pt", sample_dir / "seednet.pt", model=f"{models_py}:seednet", dtype="int8")
    if not torch.cuda.is_available():
        code, out, err = cli("verify", sample_dir / "seednet.pt", sample_dir / "seednet.pt", "--model",
                             f"{models_py}:seednet", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err
        code, out, err = cli("verify", sample_dir / "seednet.pt", sample_dir / "seednet.pt", "--model",
                             f"{models_py}:seednet", "--cross-device")
        assert code == 2
    else:  # the same commands where there is a GPU
        code, out, err = cli("verify", sample_dir / "seednet.pt", sample_dir / "seednet.safetensors", "--model",
                             f"{models_py}:seednet", "--device", "cuda", "--json")
        assert code == 0 and json.loads(out)["device"] == "cuda", err
        code, out, err = cli("verify", sample_dir / "seednet.pt", sample_dir / "seednet.pt", "--model",
                             f"{models_py}:seednet", "--cross-device", "--json")
        assert code == 0 and json.loads(out)["device"] == "cpu vs cuda", err
        n = torch.cuda.device_count()
        code, out, err = cli("verify", sample_dir / "seednet.pt", sample_dir / "seednet.pt", "--model",
                             f"{models_py}:seednet", "--device", f"cuda:{n}")
        assert code == 2 and f"only {n} CUDA device" in err and "Traceback" not in err


def test_verify_strict_failure_lists_keys(sample_dir, tmp_path, models_py):
    sd = torch.load(sample_dir / "seednet.pt", weights_only=True)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(ModelError, match="missing 1: fc.bias"):
        cs.verify(sample_dir / "seednet.pt", tmp_path / "short.pt", model=f"{models_py}:seednet")


def test_bn_without_affine_and_inputs_file(tmp_path, models):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8, affine=False)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))

    torch.manual_seed(0)
    net = models.randomize_norm_stats(Plain()).eval()
    torch.save(net.state_dict(), tmp_path / "p.pt")
    ck = cs.load(tmp_path / "p.pt")
    new, rep = cs.bn_to_gn(ck, groups=4, model=Plain())
    assert {l["layer"] for l in rep["layers"]} == {"bn", "bn2"}
    assert "bn.weight" not in new.state and "bn.running_mean" not in new.state
    gn = Plain()
    cs.swap_bn_for_gn(gn, groups=4)
    assert gn.bn.affine is False and gn.bn2.affine is True
    cs.save(new, tmp_path / "gn.pt")
    gn.load_state_dict(torch.load(tmp_path / "gn.pt", weights_only=True), strict=True)
    # calibration inputs from a tensor file; BN without affine cannot be calibrated
    torch.save(torch.randn(16, 3, 8, 8), tmp_path / "x.pt")
    with pytest.raises(SelectionError, match="without affine"):
        cs.bn_to_gn(ck, groups=4, model=Plain(), calibrate=16, inputs=str(tmp_path / "x.pt"))
    new, rep = cs.bn_to_gn(ck, groups=4, model=Plain(), layers=["bn2"], calibrate=16, inputs=str(tmp_path / "x.pt"))
    assert rep["calibration_inputs"] == 16 and rep["error_calibrated"] <= rep["error_plain"]
    # verify with the same inputs file
    r = cs.verify(tmp_path / "p.pt", tmp_path / "p.pt", model=Plain, inputs=str(tmp_path / "x.pt"))
    assert r["equivalent"] and r["inputs"].endswith("x.pt")


def test_compare_on_awkward_outputs():
    """The one-pass device-side statistics and the careful path agree on what is equivalent."""
    import importlib

    v = importlib.import_module("ckptsurgeon.plugins.verify_numerics")

    def judge(a, b, dtype="float32"):
        st = v.gather([v.output_stats(a, b)])[0]
        fast = v.compare(a, b, dtype, stats=st)
        careful = v.compare(a, b, dtype)
        assert fast["ok"] == careful["ok"] and fast["max_abs"] == pytest.approx(careful["max_abs"]), (fast, careful)
        return fast

    x = torch.randn(3, 5)
    assert judge(x, x.clone())["max_abs"] == 0
    assert not judge(x, x + 1e-3)["ok"]
    r = judge(x * 1e20, x * 1e20 * (1 + 1e-7))  # float32 norms of such values overflow; float64 ones do not
    assert r["ok"] and 0 < r["rel"] < 1e-6
    nan_both = x.clone()
    nan_both[0, 0] = float("nan")
    assert judge(nan_both, nan_both.clone())["ok"]
    assert judge(nan_both, x)["reason"] == "NaN in one output only"
    inf = x.clone()
    inf[1, 1] = float("inf")
    assert judge(inf, inf.clone())["ok"] and not judge(inf, x)["ok"]
    assert judge(x.half(), x.half().float())["ok"]  # mixed dtypes: compared in the wider one
    assert judge(x.bfloat16(), (x * 1.001).bfloat16(), "bfloat16")["ok"]
    c = torch.randn(4, dtype=torch.complex64)
    assert judge(c, c.clone())["ok"] and not judge(c, c * 1j)["ok"]
    assert v.output_stats(torch.zeros(0), torch.zeros(0)) is None and v.compare(torch.zeros(0), torch.zeros(0),
                                                                         "float32")["ok"]
    assert v.compare(torch.arange(3), torch.arange(3), "float32")["ok"]


class _Versioned(nn.Module):
    """A layer that reads its saved version on load, as torchvision's MNASNet does (it raises
    when the version is missing) and BatchNorm does (an old layout below version 2)."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        self.seen.append(version)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x):
        return self.lin(x)


def _versioned_net():
    return nn.Sequential(_Versioned(), nn.ReLU(), nn.Linear(4, 2))


def test_verify_and_fold_pass_module_versions(tmp_path):
    """load_into_model gives the model the checkpoint's module versions (renamed as the keys were
    aligned), or the model's own when the file has none: a bare dict made it pass version None,
    which MNASNet-like layers refuse (verify, fold-bn and bn-to-gn all failed on MNASNet)."""
    torch.manual_seed(0)
    net = _versioned_net()
    sd = net.state_dict()
    ddp = type(sd)(("module." + k, v) for k, v in sd.items())
    ddp._metadata = type(sd._metadata)(("module" + ("." + k if k else ""), dict(v)) for k, v in sd._metadata.items())
    ddp._metadata["module.0"]["version"] = 1  # saved by an older release of the layer
    torch.save(ddp, tmp_path / "ddp.pt")
    cs.save(cs.strip_prefix(cs.load(tmp_path / "ddp.pt"))[0], tmp_path / "plain.safetensors")  # no versions
    built = []

    def factory():
        built.append(_versioned_net())
        return built[-1]

    rep = cs.verify(tmp_path / "ddp.pt", tmp_path / "plain.safetensors", model=factory, input_shape=(2, 4))
    assert rep["equivalent"]
    assert built[0][0].seen == [1] and built[1][0].seen == [2]  # the file's version; the model's own
    ck = cs.load(tmp_path / "plain.safetensors")
    assert ck.metadata is None
    from ckptsurgeon.modelload import load_into_model

    fresh = _versioned_net()
    load_into_model(fresh, cs.load(tmp_path / "ddp.pt"))
    assert fresh[0].seen == [1] and torch.equal(fresh[2].weight, net[2].weight)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's layer of this name: BN, then its own drop and act, one module (timm keeps the BN
    parameter names so that weights trained with separate bn/act load)."""

    def __init__(self, n, act):
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                     self.eps)
        return self.act(self.drop(x))


class Conv2dSame(nn.Conv2d):
    """timm's 'same'-padding conv (pads its input, then a plain conv), as TF-ported models use."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


Conv2dSame.__module__ = "timm.layers.conv2d_same"  # the one subclass fold-bn knows by name


class StdConv2d(nn.Conv2d):
    """Weight standardization (BiT, NFNets): the weight is renormalised in forward, so a BN
    scale folded into it would vanish: never a fold target."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _TimmLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_stem = Conv2dSame(3, 8, 3, bias=False)
        self.bn1 = BatchNormAct2d(8, nn.PReLU(8))  # an act with its own parameters
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(8, nn.SiLU())
        self.std = StdConv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.bn3(self.std(self.bn2(self.conv2(self.bn1(self.conv_stem(x))))))
        return self.head(x.mean((2, 3)))


def test_fold_bn_into_library_subclasses(tmp_path, models, models_py):
    """timm builds its nets from subclasses: BatchNormAct2d (BN + drop + act in one module),
    Conv2dSame. torch.fx traced through them, so fold-bn found no BN in timm's EfficientNet,
    MobileNetV3, RegNet, DenseNet, CSPDarkNet... Now they are leaves: a norm-act BN folds and
    leaves its act (PReLU parameters kept under their names); a conv that transforms its own
    weight (weight standardization) is never folded into."""
    torch.manual_seed(0)
    net = models.randomize_norm_stats(_TimmLike()).eval()
    torch.save(net.state_dict(), tmp_path / "t.pt")
    new, rep = cs.fold_bn(cs.load(tmp_path / "t.pt"), _TimmLike())
    assert {(p["layer"], p["bn"]) for p in rep["folded"]} == {("conv_stem", "bn1"), ("conv2", "bn2")}
    assert rep["skipped"] == [{"bn": "bn3", "reason": "follows std: StdConv2d computes its own forward"}]
    assert rep["method"] == "torch.fx graph"
    cs.save(new, tmp_path / "folded.pt")
    sd = torch.load(tmp_path / "folded.pt", weights_only=True)
    assert "bn1.act.weight" in sd and "bn1.running_mean" not in sd and "conv_stem.bias" in sd
    rep = cs.verify(tmp_path / "t.pt", tmp_path / "folded.pt", model=_TimmLike, input_shape=(2, 3, 16, 16))
    assert rep["equivalent"], rep["outputs"]


def test_bn_to_gn_keeps_a_norm_act_layers_activation(tmp_path, models):
    """bn-to-gn of timm's BatchNormAct2d: the GroupNorm that replaces it keeps its drop and act
    (a bare GroupNorm dropped the activation: a different function than a norm swap), the act's
    parameters keep their keys, and calibration fits γ/β to the BN output before the activation."""
    from ckptsurgeon.layers import bn_kind
    from ckptsurgeon.plugins.norm import swap_bn_for_gn

    torch.manual_seed(0)
    net = models.randomize_norm_stats(_TimmLike()).eval()
    torch.save(net.state_dict(), tmp_path / "t.pt")
    assert bn_kind(net.bn1) == "norm-act" and bn_kind(net.bn3) == "plain"
    new, rep = cs.bn_to_gn(cs.load(tmp_path / "t.pt"), groups=4, model=_TimmLike(), calibrate=64,
                           input_shape=(3, 16, 16))
    assert rep["error_calibrated"] < rep["error_plain"]
    cs.save(new, tmp_path / "gn.pt")
    sd = torch.load(tmp_path / "gn.pt", weights_only=True)
    assert "bn1.act.weight" in sd and "bn1.running_mean" not in sd
    swapped = _TimmLike()
    swap_bn_for_gn(swapped, groups=4)
    assert isinstance(swapped.bn1, nn.GroupNorm) and isinstance(swapped.bn1.act, nn.PReLU)
    assert type(swapped.bn3) is nn.GroupNorm
    swapped.load_state_dict(sd, strict=True)
    x = torch.randn(2, 8, 5, 5)
    want = swapped.bn2.act(nn.functional.group_norm(x, 4, swapped.bn2.weight, swapped.bn2.bias))
    assert torch.allclose(swapped.bn2(x), want)
    rep = cs.verify(tmp_path / "t.pt", tmp_path / "gn.pt", model=_TimmLike, input_shape=(2, 3, 16, 16))
    assert rep["transforms_b"] == ["bn-to-gn"] and rep["outputs"][0]["max_abs"] > 0


def _inorm_net():
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_calibration_that_hurts_is_not_kept(tmp_path, cli):
    """Calibration is judged on held-out inputs. Here BN's statistics are the true ones for
    random inputs, so the plain swap to per-channel GroupNorm is close (~8 %); calibrating on
    images that are constant in space gives GN nothing to scale (its input is all zeros) and
    would zero every γ. The plain swap's γ/β are then what is written, with a note."""
    torch.manual_seed(0)
    net = _inorm_net().eval()
    with torch.no_grad():
        net[1].running_mean.copy_(net[0].bias)
        net[1].running_var.copy_((net[0].weight ** 2).sum((1, 2, 3)))
    torch.save(net.state_dict(), tmp_path / "a.pt")
    torch.save(torch.randn(8, 3, 1, 1).expand(8, 3, 16, 16).contiguous(), tmp_path / "flat.pt")
    ck = cs.load(tmp_path / "a.pt")
    plain, _ = cs.bn_to_gn(ck, groups=8, model=_inorm_net())
    new, rep = cs.bn_to_gn(ck, groups=8, model=_inorm_net(), calibrate=8, inputs=str(tmp_path / "flat.pt"))
    assert rep["error_calibrated"] > rep["error_plain"] and rep["calibration_kept"] is False
    assert any("plain swap" in n for n in rep["notes"])
    for k in plain.state:
        a, b = new.state[k], plain.state[k]
        assert torch.equal(a.to_torch() if hasattr(a, "to_torch") else a, b.to_torch() if hasattr(b, "to_torch") else b)
    (tmp_path / "m.py").write_text("from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 8, 1), "
                                   "nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))\n")
    code, out, err = cli("bn-to-gn", tmp_path / "a.pt", "-o", tmp_path / "gn.pt", "--groups", "8",
                         "--model", f"{tmp_path / 'm.py'}:net", "--calibrate", "8", "--inputs", tmp_path / "flat.pt")
    assert code == 0 and "(not kept)" in out and "plain swap" in out, out + err


def test_inputs_that_do_not_fit_the_model_are_one_line(tmp_path, cli):
    """A wrong --input-shape (or an inferred one that does not fit: a Linear after Flatten fixes
    the spatial size) made the forward raise inside verify and bn-to-gn --calibrate: 'internal
    error'. Now one line naming the inputs and the option; fold-bn's optional quick check says
    it was skipped and why, and still writes."""
    (tmp_path / "m.py").write_text(
        "import torch\n\ndef net():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), "
        "torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 2))\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("m_fit", tmp_path / "m.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.net().state_dict(), tmp_path / "n.pt")
    model = f"{tmp_path / 'm.py'}:net"
    code, out, err = cli("verify", tmp_path / "n.pt", tmp_path / "n.pt", "--model", model, "--input-shape", "2,3,9,9")
    assert code == 2 and "forward failed on the inputs float32[2, 3, 9, 9]" in err and "--input-shape" in err, err
    assert len(err.strip().splitlines()) == 1 and "internal" not in err
    code, out, err = cli("bn-to-gn", tmp_path / "n.pt", "-o", tmp_path / "g.pt", "--model", model, "--calibrate", "4",
                         "--groups", "4")
    assert code == 2 and "forward failed" in err and "internal" not in err and not (tmp_path / "g.pt").exists(), err
    code, out, err = cli("fold-bn", tmp_path / "n.pt", "-o", tmp_path / "f.pt", "--model", model)
    assert code == 0 and "quick check skipped" in out and (tmp_path / "f.pt").exists(), out + err
    code, out, err = cli("verify", tmp_path / "n.pt", tmp_path / "f.pt", "--model", model, "--input-shape", "2,3,8,8")
    assert code == 0, out + err
    # a forward that requires a second argument no one can make up: one line asking for --inputs
    (tmp_path / "m2.py").write_text(
        "import torch\n\nclass Masked(torch.nn.Linear):\n    def forward(self, x, mask):\n"
        "        return super().forward(x) * mask\n\ndef net():\n    return Masked(4, 2)\n")
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "l.pt")
    code, out, err = cli("verify", tmp_path / "l.pt", tmp_path / "l.pt", "--model", f"{tmp_path / 'm2.py'}:net")
    assert code == 2 and "requires 'mask'" in err and "--inputs" in err and len(err.strip().splitlines()) == 1, err


class _Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it), a conv whose output a residual
    add also reads (folding its BN would change what the add sees), a BN after a reshape, and
    a conv called twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc, self.bn4 = nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if x.mean() > -1e9:  # data-dependent: fx gives up here
            y = self.conv2(x)
            x = self.bn2(y) + y  # the conv's output is read twice
        x = self.bn3(self.shared(self.shared(x)))
        return self.bn4(self.fc(x.mean((2, 3))).reshape(-1, 6))


def test_fold_bn_traces_a_forward_pass_where_fx_cannot(tmp_path, models):
    """HF ResNet, MobileViT and any model with data-dependent control flow: torch.fx cannot trace
    them, and the Sequential-neighbour fallback found nothing. One forward pass with every torch
    call watched finds the pairs whose conv output only the BN reads."""
    torch.manual_seed(0)
    net = models.randomize_norm_stats(_Untraceable()).eval()
    torch.save(net.state_dict(), tmp_path / "u.pt")
    new, rep = cs.fold_bn(cs.load(tmp_path / "u.pt"), _Untraceable(), input_shape=(3, 8, 8))
    assert rep["method"].startswith("a traced forward pass")
    assert [(p["layer"], p["bn"]) for p in rep["folded"]] == [("conv1", "bn1")]
    left = {s["bn"] for s in rep["skipped"]}
    assert left == {"bn2", "bn3", "bn4"}, rep["skipped"]
    cs.save(new, tmp_path / "f.pt")
    rep = cs.verify(tmp_path / "u.pt", tmp_path / "f.pt", model=_Untraceable, input_shape=(2, 3, 8, 8))
    assert rep["equivalent"], rep["outputs"]


def test_verify_names_a_nan_module_and_fold_bn_a_shape_mismatch(sample_dir, tmp_path, models_py, cli):
    """Found by fuzzing checkpoints against their model: a module whose output is NaN on one side
    only has no max |a-b| to print (verify's report stopped with an internal error), and a BN
    statistic of another shape than the model's reached fold-bn's arithmetic (a broadcast error)."""
    sd = torch.load(sample_dir / "bnnet.pt", weights_only=True)
    nan = dict(sd)
    nan["head.weight"] = sd["head.weight"] * float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    code, out, err = cli("verify", sample_dir / "bnnet.pt", tmp_path / "nan.pt", "--model", f"{models_py}:bnnet")
    assert code == 1 and "  head (Linear): NaN in one output only" in out and "NOT EQUIVALENT" in out, out + err
    bad = dict(sd)
    bad["stem.1.running_var"] = torch.ones(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    code, out, err = cli("fold-bn", tmp_path / "bad.pt", "--model", f"{models_py}:bnnet", "-o", tmp_path / "f.pt")
    assert code == 2 and "stem.1.running_var has shape [3, 3] in the checkpoint, the model's stem.1.running_var has " \
                         "[24]" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "f.pt").exists()


def test_verify_with_a_model_the_recorded_change_does_not_fit(sample_dir, tmp_path, models_py, cli):
    """Found by fuzzing CLI options: a fold-bn (or bn-to-gn) output verified against another
    architecture's --model stopped with an internal error (the recorded change named a layer the
    model does not have). It is the user's model choice: one line naming the side and the change."""
    code, _, err = cli("fold-bn", sample_dir / "bnnet.pt", "--model", f"{models_py}:bnnet", "-o", tmp_path / "f.pt")
    assert code == 0, err
    code, _, err = cli("bn-to-gn", sample_dir / "bnnet.pt", "--model", f"{models_py}:bnnet", "--groups", "2",
                       "-o", tmp_path / "g.pt")
    assert code == 0, err
    for out, expected in (("f.pt", "B: the fold-bn change recorded in the checkpoint does not fit the model (SeedNet)"),
                          ("g.pt", "B: bn-to-gn: the model has no BatchNorm named")):
        code, _, err = cli("verify", sample_dir / "seednet.pt", tmp_path / out, "--model", f"{models_py}:seednet")
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("verify", tmp_path / "f.pt", sample_dir / "seednet.pt", "--model", f"{models_py}:seednet")
    assert code == 2 and "A: the fold-bn change" in err and "internal error" not in err, err


class _Decoder(nn.Module):
    """A decoder's up-sampling path: transposed convs (1-D, 2-D with groups and no bias, 3-D)
    each followed by BatchNorm, as DCGAN generators and U-Net decoders have them."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 8, 2, stride=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.line = nn.ConvTranspose1d(8, 6, 3, groups=2)
        self.bn3 = nn.BatchNorm1d(6)
        self.vol = nn.ConvTranspose3d(1, 3, 2)
        self.bn4 = nn.BatchNorm3d(3)

    def forward(self, x):
        y = torch.relu(self.bn2(self.up2(torch.relu(self.bn1(self.up1(x))))))
        z = self.bn3(self.line(y.flatten(2)))
        return z.mean(-1), self.bn4(self.vol(y[:, :1, :4, :4].unsqueeze(1))).mean((2, 3, 4))


def test_fold_bn_into_transposed_convolutions(tmp_path, models):
    """A transposed conv keeps its output channels in dimension 1, per group ((in, out/groups,
    *kernel)): fold-bn left every BN after one ("no BatchNorm directly follows a conv/linear"),
    and the quick check inferred the input from the first plain conv. Every pair folds, with
    groups and without a bias, and the folded model computes the same function."""
    torch.manual_seed(0)
    net = models.randomize_norm_stats(_Decoder()).eval()
    torch.save(net.state_dict(), tmp_path / "d.pt")
    new, rep = cs.fold_bn(cs.load(tmp_path / "d.pt"), _Decoder(), input_shape=(4, 5, 5))
    assert {(p["layer"], p["bn"]) for p in rep["folded"]} == {("up1", "bn1"), ("up2", "bn2"), ("line", "bn3"),
                                                              ("vol", "bn4")}
    assert rep["skipped"] == [] and [p["added_bias"] for p in rep["folded"] if p["layer"] == "up2"] == [True]
    cs.save(new, tmp_path / "f.pt")
    rep = cs.verify(tmp_path / "d.pt", tmp_path / "f.pt", model=_Decoder, input_shape=(2, 4, 5, 5))
    assert rep["equivalent"], rep["outputs"]
    from ckptsurgeon.inputs import infer_sample_shape

    assert infer_sample_shape(_Decoder()) == (4, 32, 32)  # from the first (transposed) conv


def test_verify_builds_the_model_a_program_archive_holds(tmp_path, cli):
    """A TorchScript or torch.export archive holds its own model: `verify archive weights.pt`
    needs no --model. The archive's weights (read lazily, as any checkpoint) go into the model
    it holds, the other file's into a second copy; a .pt2 runs on its own example inputs, in the
    dtypes it was exported with. A planted change is found; a .pt2 whose pickles (which
    torch.export.load unpickles unsafely) name other globals is refused before it is loaded."""
    import io
    import json
    import zipfile

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.jit.script(net).save(str(tmp_path / "scripted.pt"))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 30 * 30, 2)).eval()
    torch.jit.trace(cnn, torch.randn(1, 3, 32, 32)).save(str(tmp_path / "traced.pt"))
    ep = torch.export.export(net.eval(), (torch.randn(4, 3),))
    torch.export.save(ep, str(tmp_path / "prog.pt2"))
    for archive, last in (("scripted.pt", "2"), ("traced.pt", "4"), ("prog.pt2", "2")):
        code, _, err = cli("add-prefix", tmp_path / archive, "--prefix", "module.", "-o", tmp_path / "dp.pt")
        assert code == 0, err
        extra = ()  # a scripted model's input shape comes from its first Linear, as for an nn.Module
        code, out, err = cli("verify", tmp_path / archive, tmp_path / "dp.pt", *extra, "--json")
        rep = json.loads(out)
        assert code == 0 and rep["equivalent"], out + err
        if archive == "prog.pt2":
            assert rep["inputs"] == "the program's example inputs" and rep["outputs"][0]["shape"] == [4, 2]
            assert rep["dtype"] == "as exported"
        else:
            assert any("TorchScript archive A" in n for n in rep["notes"])
        code, out, err = cli("verify", tmp_path / "dp.pt", tmp_path / archive)  # the archive as B does too
        assert code == 0 and "EQUIVALENT" in out, out + err
        planted = torch.load(tmp_path / "dp.pt", weights_only=True)
        planted[f"module.{last}.bias"] += 1
        torch.save(planted, tmp_path / "planted.pt")
        code, out, err = cli("verify", tmp_path / archive, tmp_path / "planted.pt", *extra)
        assert code == 1 and "NOT EQUIVALENT" in out, out + err

    code, _, err = cli("verify", tmp_path / "dp.pt", tmp_path / "planted.pt")
    assert code == 2 and "verify needs --model (or, as A or B," in err, err

    evil = b"cos\nsystem\n(S'touch PWNED'\ntR."
    with zipfile.ZipFile(tmp_path / "prog.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as z:
        for n in src.namelist():
            z.writestr(n, src.read(n))
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as i:
            i.writestr("archive/data.pkl", evil)
        z.writestr("prog/data/constants/tensor_9", inner.getvalue())
    code, _, err = cli("verify", tmp_path / "evil.pt2", tmp_path / "dp.pt")
    errors = [line for line in err.splitlines() if line.startswith("ckpt-surgeon: error:")]
    assert code == 2 and len(errors) == 1 and "os.system" in errors[0] and "torch.export.load" in errors[0], err
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
