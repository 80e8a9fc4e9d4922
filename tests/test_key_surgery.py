"""strip-prefix, add-prefix, rename, extract and partial loading on real torch/safetensors files."""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import ckptsurgeon as cs
from ckptsurgeon.errors import CkptSurgeonError, KeyCollisionError, SelectionError


def _bytes_of(path):
    ck = cs.load(path)
    return {k: bytes(v.read_bytes()) for k, v in ck.tensor_items()}


@pytest.mark.parametrize("name,prefix", [
    ("seednet_dp.pt", "module."), ("seednet_compiled.pt", "_orig_mod."), ("seednet_lightning.ckpt", "model."),
])
def test_strip_detects_wrapper_prefix(sample_dir, tmp_path, models, name, prefix):
    ck = cs.load(sample_dir / name)
    new, rep = cs.strip_prefix(ck)
    assert rep["prefix"] == prefix and rep["detected"] and rep["renamed"] == 28
    cs.save(new, tmp_path / "out.pt")
    net = models.seednet()
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    sd = out["state_dict"] if name.endswith(".ckpt") else out
    net.load_state_dict(sd, strict=True)
    if name.endswith(".ckpt"):  # wrapper content untouched
        orig = torch.load(sample_dir / name, weights_only=True)
        assert out["epoch"] == orig["epoch"] and out["hyper_parameters"] == orig["hyper_parameters"]
        assert out["optimizer_states"][0]["param_groups"] == orig["optimizer_states"][0]["param_groups"]


def test_stacked_prefix_ddp_of_compiled(tmp_path, seednet_sd):
    sd = OrderedDict(("module._orig_mod." + k, v) for k, v in seednet_sd.items())
    torch.save(sd, tmp_path / "ddp_compiled.pt")
    new, rep = cs.strip_prefix(cs.load(tmp_path / "ddp_compiled.pt"))
    assert rep["prefix"] == "module._orig_mod."
    assert list(new.state) == list(seednet_sd)


def test_strip_then_add_round_trips_bytes_and_wrapper(sample_dir, tmp_path):
    resume = torch.load(sample_dir / "seednet_resume.pt", weights_only=True)
    resume["model_state_dict"] = OrderedDict(("module." + k, v) for k, v in resume["model_state_dict"].items())
    torch.save(resume, tmp_path / "dp_resume.pt")
    a = cs.load(tmp_path / "dp_resume.pt")
    stripped, _ = cs.strip_prefix(a)
    cs.save(stripped, tmp_path / "s.pt")
    back, _ = cs.add_prefix(cs.load(tmp_path / "s.pt"), "module.")
    cs.save(back, tmp_path / "r.pt")
    assert _bytes_of(tmp_path / "r.pt") == _bytes_of(tmp_path / "dp_resume.pt")
    x, y = torch.load(tmp_path / "dp_resume.pt", weights_only=True), torch.load(tmp_path / "r.pt", weights_only=True)
    assert x["epoch"] == y["epoch"] and x["scheduler_state_dict"] == y["scheduler_state_dict"]
    for i in x["optimizer_state_dict"]["state"]:
        assert torch.equal(x["optimizer_state_dict"]["state"][i]["exp_avg"], y["optimizer_state_dict"]["state"][i]["exp_avg"])
    # and through safetensors the other way round
    cs.save(stripped, tmp_path / "s.safetensors")
    back2, rep = cs.add_prefix(cs.load(tmp_path / "s.safetensors"), "module")  # '.' added
    assert set(back2.state) == set(a.state) and not any("already" in n for n in rep["notes"])
    # adding it again is allowed (nested DataParallel exists) but said
    _, rep = cs.add_prefix(back2, "module.")
    assert "every key already started with 'module.': they now start with 'module.module.'" in rep["notes"]


def test_metadata_follows_strip(sample_dir):
    new, _ = cs.strip_prefix(cs.load(sample_dir / "seednet_dp.pt"))
    assert "bn1" in new.metadata and "module.bn1" not in new.metadata and "" in new.metadata


@pytest.mark.parametrize("odd", ["junk", 5, [1, 2], {1: {}, "module.a": {"version": 1}}])
def test_an_odd_metadata_is_carried_not_a_crash(tmp_path, cli, odd):
    """A state dict's ``_metadata`` that is no mapping of module paths (a string, a number, a
    list, int keys) was an internal error in strip-prefix, extract and add-prefix; what cannot be
    renamed is carried as it is, the module paths that can are."""
    sd = OrderedDict([("module.a.weight", torch.ones(2)), ("module.b.weight", torch.zeros(2))])
    sd._metadata = odd
    torch.save(sd, tmp_path / "odd.pt")
    for cmd in (["strip-prefix"], ["extract", "--layers", "module.a"], ["add-prefix", "--prefix", "x."]):
        code, _, err = cli(*cmd, tmp_path / "odd.pt", "-o", tmp_path / "out.pt", "-q")
        assert code == 0, (cmd, err)
        got = torch.load(tmp_path / "out.pt", weights_only=True)
        if isinstance(odd, dict):
            renamed = {"strip-prefix": "a", "extract": "module.a", "add-prefix": "x.module.a"}[cmd[0]]
            assert got._metadata == OrderedDict([(1, {}), (renamed, {"version": 1})]), (cmd, got._metadata)
        else:
            assert got._metadata == odd


def test_strip_errors(sample_dir, tmp_path):
    with pytest.raises(SelectionError, match="no wrapper prefix"):
        cs.strip_prefix(cs.load(sample_dir / "seednet.pt"))
    with pytest.raises(SelectionError, match="no key starts"):
        cs.strip_prefix(cs.load(sample_dir / "seednet.pt"), "module.")
    sd = OrderedDict([("module.a", torch.ones(1)), ("b", torch.ones(1))])
    torch.save(sd, tmp_path / "mixed.pt")
    with pytest.raises(SelectionError, match="only 1 of 2"):
        cs.strip_prefix(cs.load(tmp_path / "mixed.pt"), "module.")
    new, rep = cs.strip_prefix(cs.load(tmp_path / "mixed.pt"), "module.", partial=True)
    assert list(new.state) == ["a", "b"] and rep["unchanged"] == 1
    sd = OrderedDict([("module.a", torch.ones(1)), ("a", torch.zeros(1))])
    torch.save(sd, tmp_path / "collide.pt")
    with pytest.raises(KeyCollisionError) as e:
        cs.strip_prefix(cs.load(tmp_path / "collide.pt"), "module.", partial=True)
    assert "module.a + a -> a" in str(e.value)
    # --prefix module (no dot): the component is stripped, not 'module' off '.a'; a prefix that
    # ends inside a name component ('encoder_') is taken as given
    new, rep = cs.strip_prefix(cs.load(tmp_path / "mixed.pt"), "module", partial=True)
    assert list(new.state) == ["a", "b"] and rep["prefix"] == "module." and "normalised" in rep["notes"][0]
    torch.save(OrderedDict([("encoder_layer.w", torch.ones(1)), ("encoder_head.w", torch.ones(1))]), tmp_path / "e.pt")
    new, rep = cs.strip_prefix(cs.load(tmp_path / "e.pt"), "encoder_")
    assert list(new.state) == ["layer.w", "head.w"] and "notes" not in rep


def test_rename_rules_inverse_and_dry_run(sample_dir, tmp_path, cli):
    ck = cs.load(sample_dir / "seednet.pt")
    new, rep = cs.rename(ck, [(r"^conv(\d)\.", r"features.conv\1."), (r"^fc\.", "head.")])
    assert "features.conv1.weight" in new.state and "head.bias" in new.state
    assert rep["mapping"]["fc.weight"] == "head.weight"
    undone, _ = cs.rename(new, rep["inverse"])
    assert list(undone.state) == list(ck.state)
    with pytest.raises(SelectionError, match="matched no key"):
        cs.rename(ck, [("^nothing", "x")])
    with pytest.raises(KeyCollisionError):
        cs.rename(ck, [(r"\.weight$", ".bias")])
    (tmp_path / "map.json").write_text(json.dumps({"^fc\\.": "classifier."}))
    code, out, err = cli("rename", sample_dir / "seednet.pt", "--map-file", tmp_path / "map.json", "--dry-run")
    assert code == 0 and "fc.weight -> classifier.weight" in out and not list(tmp_path.glob("*.pt"))
    (tmp_path / "map.toml").write_text('rules = [["^fc\\\\.", "out."]]\n')
    code, out, err = cli("rename", sample_dir / "seednet.pt", "--map-file", tmp_path / "map.toml",
                         "-o", tmp_path / "r.safetensors", "--save-inverse", tmp_path / "undo.json")
    assert code == 0, err
    assert "out.weight" in cs.load(tmp_path / "r.safetensors").state
    code, out, err = cli("rename", tmp_path / "r.safetensors", "--map-file", tmp_path / "undo.json", "-o", tmp_path / "u.pt")
    assert code == 0, err
    assert sorted(cs.load(tmp_path / "u.pt").state) == sorted(cs.load(sample_dir / "seednet.pt").state)


def test_a_module_path_rule_that_matches_inside_names_is_noted(tmp_path, cli):
    """'layer.1=>block1' also renames layer.10 (to block10): a regex does what it says, but a rule
    written like a module path rarely means that. The note names what happened and gives the rule
    that matches whole components only, which then does what was meant."""
    import re

    torch.save(OrderedDict((k, torch.ones(1)) for k in ("layer.1.w", "layer.10.w", "fc.w", "myfc.w", "a.fc.w")),
               tmp_path / "m.pt")
    ck = cs.load(tmp_path / "m.pt")
    _, rep = cs.rename(ck, [("layer.1", "block1"), (r"fc\.", "head.")])
    notes = rep["notes"]
    assert len(notes) == 2 and "layer.10.w -> block10.w" in notes[0] and "myfc.w -> myhead.w" in notes[1]
    fixed = [re.search(r"only: '(.*)'$", n).group(1) for n in notes]
    new, rep = cs.rename(ck, [(fixed[0], "block1"), (fixed[1], "head.")])
    assert list(new.state) == ["block1.w", "layer.10.w", "head.w", "myfc.w", "a.head.w"] and "notes" not in rep
    _, rep = cs.rename(ck, [(r"^layer\.1\.", "block1."), ("fc", "head")])  # anchored, or whole components: no note
    assert "notes" not in rep or not any("layer" in n for n in rep["notes"])
    code, out, _ = cli("rename", tmp_path / "m.pt", "--map", "layer.1=>block1", "--dry-run")
    assert code == 0 and "also matched inside a name component" in out


def test_extract_layers_buffers_reroot(sample_dir, tmp_path, models):
    ck = cs.load(sample_dir / "seednet_resume.pt")
    new, rep = cs.extract(ck, ["conv1", "bn1,conv2"], exclude=["conv2.bias"])
    assert set(new.state) == {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                              "bn1.num_batches_tracked", "conv2.weight"}
    assert rep["dropped_wrapper_keys"] == ["optimizer_state_dict"]
    cs.save(new, tmp_path / "part.pt")
    out = torch.load(tmp_path / "part.pt", weights_only=True)
    assert "optimizer_state_dict" not in out and out["epoch"] == 3
    # buffers come with the layer even when only its weight is matched
    new, _ = cs.extract(ck, ["re:^bn4\\.weight$"])
    assert "bn4.running_var" in new.state
    # component matching: 'conv' is no prefix of 'conv1'
    with pytest.raises(SelectionError, match="'conv'"):
        cs.extract(ck, ["conv"])
    # a mistyped name gets the closest ones; one that resembles nothing, the top-level modules
    with pytest.raises(SelectionError) as e:
        cs.extract(ck, ["bn1.runing_mean"])
    assert "did you mean 'bn1.running_mean'" in e.value.hint
    with pytest.raises(SelectionError) as e:
        cs.extract(ck, ["conv1"], exclude=["conv1.wieght"])
    assert "did you mean 'conv1.weight'" in e.value.hint
    with pytest.raises(SelectionError) as e:
        cs.extract(ck, ["decoder"])
    assert e.value.hint.startswith("top-level modules: conv1, bn1")
    # names with no module path (a Linear's own 'weight', under DataParallel): the names (the hint was empty)
    bare = cs.Checkpoint(state=OrderedDict([("module.weight", torch.ones(2)), ("module.bias", torch.ones(1))]))
    with pytest.raises(SelectionError) as e:
        cs.extract(bare, ["conv"])
    assert e.value.hint == "its keys: module.weight, module.bias"
    new, _ = cs.extract(ck, ["*.running_*"])
    assert all("running" in k or k.endswith(("weight", "bias", "num_batches_tracked")) for k in new.state)
    # the model's own top-level tensors (a ViT's cls_token, pos_embed) belong to no one module:
    # each comes only when chosen, with or without a wrapper prefix
    for pre in ("", "module."):
        sd = {f"{pre}cls_token": torch.zeros(1, 1, 4), f"{pre}pos_embed": torch.zeros(1, 5, 4),
              f"{pre}patch_embed.proj.weight": torch.zeros(4, 3, 2, 2), f"{pre}patch_embed.proj.bias": torch.zeros(4)}
        torch.save(sd, tmp_path / "vit.pt")
        new, _ = cs.extract(cs.load(tmp_path / "vit.pt"), ["cls_token", "patch_embed.proj.weight"])
        assert set(new.state) == {f"{pre}cls_token", f"{pre}patch_embed.proj.weight", f"{pre}patch_embed.proj.bias"}


def test_extract_summary_of_many_patterns_stays_short(tmp_path, cli):
    """A generated --layers list (every other of 40 layers) is summed up after the first few
    patterns; --json still has every pattern's count."""
    torch.save(OrderedDict((f"layer{i}.{p}", torch.zeros(2)) for i in range(40) for p in ("weight", "bias")),
               tmp_path / "m.pt")
    layers = ",".join(f"layer{i}" for i in range(0, 40, 2))
    code, out, err = cli("extract", tmp_path / "m.pt", "--layers", layers, "-o", tmp_path / "o.pt")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("kept 40 tensors") and "  'layer0': 2 keys" in lines
    assert "  and 13 more patterns: 26 keys" in lines and "  'layer38': 2 keys" not in lines
    assert len(lines) < 12
    code, out, _ = cli("extract", tmp_path / "m.pt", "--layers", layers, "-o", tmp_path / "o.pt", "--json")
    assert code == 0 and len(json.loads(out)["patterns"]) == 20


def test_extract_reroot_loads_into_submodel(tmp_path, models):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = models.seednet()
            self.head = nn.Linear(10, 3)

    net = Net()
    torch.save(nn.DataParallel(net).state_dict(), tmp_path / "full.pt")
    new, rep = cs.extract(cs.load(tmp_path / "full.pt"), ["backbone"], reroot="backbone.")
    cs.save(new, tmp_path / "bb.safetensors")
    sub = models.seednet()
    from safetensors.torch import load_file

    sub.load_state_dict(load_file(tmp_path / "bb.safetensors"), strict=True)
    assert torch.equal(sub.fc.weight, net.backbone.fc.weight.cpu())  # DataParallel moved net to cuda:0 where there is one


def test_load_partial_head_differs_and_min_match(sample_dir, models):
    from ckptsurgeon.plugins.partial import PartialLoadError

    model = models.seednet(num_classes=7)  # head shape differs from the checkpoint's
    before = model.fc.weight.detach().clone()
    rep = cs.load_partial(model, sample_dir / "seednet_dp.pt", freeze=True, min_match=0.9)
    assert rep["alignment"].startswith("strip") and rep["loaded"] == 26
    assert {m["key"] for m in rep["shape_mismatched"]} == {"fc.weight", "fc.bias"}
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert torch.equal(model.fc.weight, before)
    ref = torch.load(sample_dir / "seednet.pt", weights_only=True)
    assert torch.equal(model.conv1.weight, ref["conv1.weight"])
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(PartialLoadError) as e:
        cs.load_partial(other, sample_dir / "seednet.pt", min_match=0.5)
    assert e.value.report["loaded"] == 0
    only_bb = models.seednet(num_classes=7)
    rep = cs.load_partial(only_bb, sample_dir / "seednet.pt", layers=["conv1", "bn1"], min_match=1.0)
    assert rep["requested"] == 6 and rep["loaded"] == 6


def test_check_cli(sample_dir, cli, models_py):
    code, out, err = cli("check", sample_dir / "seednet_lightning.ckpt", "--model", f"{models_py}:seednet")
    assert code == 0 and "loaded 28 of 28" in out
    code, out, err = cli("check", sample_dir / "seednet.pt", "--model", f"{models_py}:bnnet", "--json")
    assert code == 1 and json.loads(out)["loaded"] == 0
    for bad in ("5", "-1"):  # a fraction: above 1 failed every load, below 0 passed any
        code, _, err = cli("check", sample_dir / "seednet.pt", "--model", f"{models_py}:seednet", "--min-match", bad)
        assert code == 2 and "between 0 and 1" in err, err


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_per_block_compile_and_wrappers_inside_keys(tmp_path, cli):
    """torchtitan-style training compiles each block (model.layers[i] = torch.compile(block)) and
    wraps the model in DDP: keys read module.layers.0._orig_mod.0.weight. strip-prefix found no
    prefix carried by every key and gave up; now the leading stack and the inner wrapper parts go,
    _metadata follows, and diff / verify line such a file up with a plain one."""
    torch.manual_seed(0)
    model = _Blocks().eval()
    plain = model.state_dict()
    torch.save(plain, tmp_path / "plain.pt")
    for i in range(2):
        model.layers[i] = torch.compile(model.layers[i])
    compiled = model.state_dict()
    assert "layers.0._orig_mod.0.weight" in compiled
    torch.save(compiled, tmp_path / "blocks.pt")
    ddp = OrderedDict(("module." + k, v) for k, v in compiled.items())
    ddp._metadata = OrderedDict([("", {"version": 1})] + [("module" + ("." + k if k else ""), v)
                                                         for k, v in compiled._metadata.items()])
    torch.save({"model": ddp, "step": 7}, tmp_path / "ddp_blocks.pt")
    for src in ("blocks.pt", "ddp_blocks.pt"):
        code, out, err = cli("strip-prefix", tmp_path / src, "-o", tmp_path / "out.pt")
        assert code == 0 and "'_orig_mod' (8 keys)" in out, out + err
        got = torch.load(tmp_path / "out.pt", weights_only=True)
        got = got["model"] if "model" in got else got
        assert list(got) == list(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
        _Blocks().load_state_dict(got, strict=True)
    assert "layers.0" in torch.load(tmp_path / "out.pt", weights_only=True)["model"]._metadata
    rep = cs.diff(tmp_path / "plain.pt", tmp_path / "ddp_blocks.pt")
    assert rep["equal"] == len(plain) and not rep["only_in_a"] and not rep["only_in_b"] and not rep["changed"]
    assert "_orig_mod" in rep["alignment"]["note"] and "'module.' from B" in rep["alignment"]["note"]
    rep = cs.verify(tmp_path / "plain.pt", tmp_path / "ddp_blocks.pt", model=_Blocks, input_shape=(2, 4))
    assert rep["equivalent"] and "drop inner _orig_mod" in rep["alignment"]["b"]
    # a model whose own keys carry the wrapper (compiled per block here too) loads as is
    blocks = _Blocks()
    for i in range(2):
        blocks.layers[i] = torch.compile(blocks.layers[i])
    from ckptsurgeon.modelload import load_into_model

    assert load_into_model(blocks, cs.load(tmp_path / "blocks.pt")) == "as is"


def test_a_rename_that_empties_a_name_is_refused(tmp_path, cli):
    torch.save({"w": torch.ones(2), "w.b": torch.ones(1)}, tmp_path / "a.pt")
    for args in (["strip-prefix", "--prefix", "w", "--partial"], ["rename", "--map", "^w$=>"]):
        code, out, err = cli(args[0], tmp_path / "a.pt", *args[1:], "-o", tmp_path / "b.pt")
        assert code == 2 and "empty name" in err and not (tmp_path / "b.pt").exists(), err


def _flat_buffer_state(dtype=torch.float32, n_layers=8, cols=512):
    """Parameters as views of one flat buffer, as DeepSpeed ZeRO-1/2 and Megatron's contiguous
    buffers leave them: torch.save writes the buffer once, every view points into it."""
    rows = (512 << 10) // cols // torch.empty(0, dtype=dtype).element_size()  # 512 KiB a layer
    per = rows * cols + cols
    flat = torch.randn(n_layers * per + 64).to(dtype)
    sd = OrderedDict()
    for i in range(n_layers):
        base = i * per
        sd[f"module.layer{i}.weight"] = flat[base:base + rows * cols].view(rows, cols)
        sd[f"module.layer{i}.bias"] = flat[base + rows * cols:base + per]
    sd["module.layer0.tied"] = sd["module.layer0.weight"]  # tied: same view
    sd["module.layer1.wt"] = sd["module.layer1.weight"].t()  # a transposed view of another
    sd["module.layer1.overlap"] = flat[per - 8:per + 8]  # reaches across two layers' bytes
    return flat, sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_extract_cuts_a_shared_flat_buffer_to_what_is_kept(tmp_path, cli, flip_byte, dtype):
    flat, sd = _flat_buffer_state(dtype)
    path = tmp_path / "ds.pt"
    torch.save({"module": sd, "epoch": 2}, path)
    size = path.stat().st_size
    code, out, _ = cli("inspect", path, "--json")
    # 16 layer tensors, the transposed and the overlapping view; the tie counts once
    assert json.loads(out)["shared_storages"] == [{"tensors": 18, "bytes": flat.untyped_storage().nbytes()}]
    code, out, err = cli("extract", path, "--layers", "module.layer0,module.layer1", "-o", tmp_path / "x.pt")
    assert code == 0, err
    assert "cut to the parts the written tensors use" in out + err
    x_size = (tmp_path / "x.pt").stat().st_size
    kept = sd["module.layer2.weight"].storage_offset() * flat.element_size()  # layers 0 and 1
    assert x_size < kept + 64 * 1024 and x_size < size / 3  # about layers 0-1, not the whole buffer

    def same(a, b):
        return a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    for mmap in (False, True):
        out_sd = torch.load(tmp_path / "x.pt", weights_only=True, mmap=mmap)["module"]
        assert set(out_sd) == {k for k in sd if k.startswith(("module.layer0.", "module.layer1."))}
        for k, v in out_sd.items():
            assert same(v.contiguous(), sd[k].contiguous()) and v.stride() == sd[k].stride(), k
        # views that shared bytes still share them: one storage, ties at the same place
        assert out_sd["module.layer0.tied"].data_ptr() == out_sd["module.layer0.weight"].data_ptr()
        assert out_sd["module.layer1.wt"].data_ptr() == out_sd["module.layer1.weight"].data_ptr()
        assert len({v.untyped_storage().data_ptr() for v in out_sd.values()}) == 1
        assert (out_sd["module.layer1.overlap"][:8].view(torch.uint8)
                == out_sd["module.layer0.bias"][-8:].view(torch.uint8)).all()

    # everything kept: the buffer is copied as it was, record for record
    code, _, err = cli("strip-prefix", path, "-o", tmp_path / "s.pt", "-q")
    assert code == 0 and abs((tmp_path / "s.pt").stat().st_size - size) < 4096, err

    # a damaged byte in a part left out still stops the write: the record's CRC covers it all
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    flip_byte(path, info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 100)
    code, _, err = cli("extract", path, "--layers", "module.layer0", "-o", tmp_path / "bad.pt")
    assert code == 2 and "CRC-32 mismatch" in err and not (tmp_path / "bad.pt").exists(), err


def test_a_storage_pickled_bare_is_never_cut(tmp_path):
    flat, sd = _flat_buffer_state(torch.float8_e4m3fn)  # an untyped storage, as torch saves float8 ones
    torch.save({"module": sd, "buffer": flat.untyped_storage()}, tmp_path / "a.pt")
    new, _ = cs.extract(cs.load(tmp_path / "a.pt"), ["module.layer0"])
    rep = cs.save(new, tmp_path / "b.pt")
    assert not any("cut to" in n for n in rep["notes"])
    out = torch.load(tmp_path / "b.pt", weights_only=True)
    with warnings.catch_warnings():  # torch < 2.13 loads a bare storage as a (deprecated) TypedStorage
        warnings.simplefilter("ignore", UserWarning)
        assert out["buffer"].nbytes() == flat.untyped_storage().nbytes()
    assert torch.equal(out["module"]["module.layer0.weight"].view(torch.uint8), sd["module.layer0.weight"].view(torch.uint8))


def test_subsets_of_views_of_one_buffer_round_trip(tmp_path):
    """Random subsets of random views of one 3 MiB buffer (slices, 2-D and transposed views,
    strided, stride-0 expanded, empty, ties; five dtypes) written by the torch writer, which cuts
    the buffer to the parts used: every tensor comes back with its shape, strides and bytes, read
    plainly and with mmap=True, and tensors that shared their first byte still do."""
    import random

    rng = random.Random(0)
    cut = 0
    for _trial in range(40):
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
        n = (3 << 20) // torch.empty(0, dtype=dtype).element_size()
        flat = (torch.randn(n) * 100).to(dtype)
        sd = {}
        for i in range(rng.randint(2, 12)):
            kind, off = rng.choice(["slice", "2d", "t", "strided", "expand", "empty", "tie"]), rng.randrange(0, n - 5000)
            t = {"slice": lambda: flat[off:off + rng.randint(1, 4000)],
                 "2d": lambda: flat[off:off + 2048].view(64, 32),
                 "t": lambda: flat[off:off + 2048].view(64, 32).t(),
                 "strided": lambda: flat[off:off + 3000:rng.randint(2, 7)],
                 "expand": lambda: flat[off:off + 1].expand(10),
                 "empty": lambda: flat[off:off],
                 "tie": lambda: sd[rng.choice(list(sd))] if sd else flat[:5]}[kind]()
            sd[f"m{i}.w"] = t
        torch.save(sd, tmp_path / "p.pt")
        chosen = rng.sample(list(sd), rng.randint(1, len(sd)))
        ck = cs.load(tmp_path / "p.pt")
        rep = cs.save(ck.with_state({k: ck.state[k] for k in chosen}), tmp_path / "o.pt")
        cut += any("cut to" in note for note in rep["notes"])
        for mmap in (False, True):
            out = torch.load(tmp_path / "o.pt", weights_only=True, mmap=mmap)
            for k in chosen:
                a, b = out[k], sd[k]
                assert a.shape == b.shape and a.stride() == b.stride(), k
                assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), k
            for k1 in chosen:
                for k2 in chosen:
                    if sd[k1].numel() and sd[k2].numel() and sd[k1].data_ptr() == sd[k2].data_ptr():
                        assert out[k1].data_ptr() == out[k2].data_ptr(), (k1, k2)
    assert cut > 30  # most subsets leave most of the 3 MiB unused


def test_strip_prefix_names_other_state_dicts_with_the_prefix(tmp_path, cli):
    """A timm train.py checkpoint holds state_dict and state_dict_ema, both DDP-prefixed: one is
    rewritten per run (the chosen one), and the report names the other with the way to strip it."""
    import argparse

    sd = OrderedDict((f"module.blocks.{i}.weight", torch.randn(4, 4)) for i in range(3))
    ema = OrderedDict((k, v + 1) for k, v in sd.items())
    torch.save({"epoch": 3, "state_dict": sd, "state_dict_ema": ema, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "ckpt.pth.tar")
    code, out, err = cli("strip-prefix", tmp_path / "ckpt.pth.tar", "-o", tmp_path / "a.pth")
    assert code == 0, err
    assert "note: state_dict_ema also carries 'module.' on every key, left as it is (to strip it too: " \
           "--key state_dict --key state_dict_ema)" in out
    code, out, err = cli("strip-prefix", tmp_path / "a.pth", "--key", "state_dict_ema", "-o", tmp_path / "b.pth")
    assert code == 0 and "also carries" not in out, err
    # the way the note says: both in one run
    code, out, err = cli("strip-prefix", tmp_path / "ckpt.pth.tar", "--key", "state_dict", "--key", "state_dict_ema",
                         "-o", tmp_path / "c.pth")
    assert code == 0 and "also carries" not in out and out.count("stripped detected prefix 'module.'") == 2, out + err
    for name in ("b.pth", "c.pth"):
        both = torch.load(tmp_path / name, weights_only=False)  # (argparse.Namespace: our own file)
        assert list(both["state_dict"]) == list(both["state_dict_ema"]) == [f"blocks.{i}.weight" for i in range(3)]
        assert torch.equal(both["state_dict_ema"]["blocks.1.weight"], ema["module.blocks.1.weight"])
        assert torch.equal(both["state_dict"]["blocks.2.weight"], sd["module.blocks.2.weight"])
        assert both["epoch"] == 3 and both["args"].lr == 0.1
    _, rep = cs.strip_prefix(cs.load(tmp_path / "ckpt.pth.tar", key="state_dict_ema"))
    assert rep["notes"] == ["state_dict also carries 'module.' on every key, left as it is (to strip it too: "
                            "--key state_dict_ema --key state_dict)"]


def test_key_surgery_on_several_state_dicts_of_one_wrapper(tmp_path, cli):
    """A GAN's G and D (DINO's student and teacher), each saved under DataParallel: --key given
    once per state dict changes each in turn in one run (strip-prefix, add-prefix, rename, cast), with a
    block per state dict; errors say which state dict. The API: Checkpoint.select."""
    g = OrderedDict([("module.conv.weight", torch.randn(4, 3)), ("module.conv.bias", torch.randn(4))])
    d = OrderedDict([("module.fc.weight", torch.randn(1, 4)), ("module.fc.bias", torch.randn(1))])
    g._metadata = OrderedDict([("", {"version": 1}), ("module.conv", {"version": 1})])
    torch.save({"G": g, "D": d, "epoch": 7, "opt_G": {"lr": 0.1}}, tmp_path / "gan.pt")
    code, _, err = cli("strip-prefix", tmp_path / "gan.pt", "-o", tmp_path / "x.pt")
    assert code == 2 and "several state dicts" in err and "given once for each" in err, err
    assert "--key '<bare>' takes them together as one nested state dict (their names joined: G.<name>)" in err
    code, out, err = cli("strip-prefix", tmp_path / "gan.pt", "--key", "G", "--key", "D", "-o", tmp_path / "s.pt")
    assert code == 0 and out.startswith("[G]\n") and "\n[D]\n" in out and out.count("wrote ") == 1, out + err
    got = torch.load(tmp_path / "s.pt", weights_only=True)
    assert list(got["G"]) == ["conv.weight", "conv.bias"] and list(got["D"]) == ["fc.weight", "fc.bias"]
    assert torch.equal(got["D"]["fc.weight"], d["module.fc.weight"]) and got["epoch"] == 7
    assert got["opt_G"] == {"lr": 0.1} and dict(got["G"]._metadata) == {"": {"version": 1}, "conv": {"version": 1}}
    code, out, err = cli("rename", tmp_path / "s.pt", "--key", "G", "--key", "D", "--map", r"\.bias$=>.b",
                         "--json", "-o", tmp_path / "r.pt")
    rep = json.loads(out)
    assert code == 0 and [r["renamed"] for r in rep["state_dicts"].values()] == [1, 1], out + err
    got = torch.load(tmp_path / "r.pt", weights_only=True)
    assert list(got["G"]) == ["conv.weight", "conv.b"] and list(got["D"]) == ["fc.weight", "fc.b"]
    # a rule is unmatched only when it matches in none of them
    code, out, err = cli("rename", tmp_path / "s.pt", "--key", "G", "--key", "D", "--map", "^conv=>c", "-o",
                         tmp_path / "r2.pt")
    assert code == 0 and list(torch.load(tmp_path / "r2.pt", weights_only=True)["G"]) == ["c.weight", "c.bias"], err
    code, _, err = cli("rename", tmp_path / "s.pt", "--key", "G", "--key", "D", "--map", "nothing=>x", "-o",
                       tmp_path / "r3.pt")
    assert code == 2 and "matched no key in G, D" in err and not (tmp_path / "r3.pt").exists(), err
    code, out, err = cli("add-prefix", tmp_path / "s.pt", "--key", "D", "--key", "G", "--prefix", "module.", "-o",
                         tmp_path / "a.pt")
    assert code == 0 and out.startswith("[D]\n"), out + err
    got = torch.load(tmp_path / "a.pt", weights_only=True)
    assert list(got["G"]) == list(g) and list(got["D"]) == list(d) and list(got) == ["G", "D", "epoch", "opt_G"]
    # cast: both to bf16 in one run; a --keep pattern that matches in one of them is fine, in none an error
    code, out, err = cli("cast", tmp_path / "gan.pt", "--key", "G", "--key", "D", "--dtype", "bf16", "--keep", "*fc.bias",
                         "-o", tmp_path / "c.pt")
    assert code == 0 and out.startswith("[G]\n") and "\n[D]\n" in out, out + err
    assert out.count("kept as they are (optimizer state included): epoch, opt_G\n") == 2, out  # not D or G
    got = torch.load(tmp_path / "c.pt", weights_only=True)
    assert [v.dtype for v in got["G"].values()] == [torch.bfloat16] * 2
    assert [v.dtype for v in got["D"].values()] == [torch.bfloat16, torch.float32]
    assert torch.equal(got["G"]["module.conv.weight"], g["module.conv.weight"].bfloat16())
    code, _, err = cli("cast", tmp_path / "gan.pt", "--key", "G", "--key", "D", "--dtype", "bf16", "--keep", "*nope*",
                       "-o", tmp_path / "c2.pt")
    assert code == 2 and "matched nothing in G, D" in err and not (tmp_path / "c2.pt").exists(), err
    # errors name the state dict; nothing is written
    code, _, err = cli("strip-prefix", tmp_path / "s.pt", "--key", "G", "--key", "D", "-o", tmp_path / "e.pt")
    assert code == 2 and "error: state dict G: no wrapper prefix" in err and not (tmp_path / "e.pt").exists(), err
    code, _, err = cli("strip-prefix", tmp_path / "gan.pt", "--key", "G", "--key", "nope", "-o", tmp_path / "e.pt")
    assert code == 2 and "state dict nope:" in err and not (tmp_path / "e.pt").exists(), err
    code, _, err = cli("strip-prefix", tmp_path / "gan.pt", "--key", "G", "--key", "G", "-o", tmp_path / "e.pt")
    assert code == 2 and "--key G is given twice" in err, err
    # an output that holds one state dict would keep the last alone: refused up front
    for out, extra in (("e.safetensors", []), ("e.pt", ["--state-dict-only"]), ("e_dir", ["--max-shard-size", "1MB"])):
        code, _, err = cli("strip-prefix", tmp_path / "gan.pt", "--key", "G", "--key", "D", "-o", tmp_path / out,
                           *extra)
        assert code == 2 and "several --key" in err and not (tmp_path / out).exists(), (out, err)
    code, _, err = cli("rename", tmp_path / "gan.pt", "--key", "G", "--key", "D", "--map", "a=>b", "--save-inverse",
                       tmp_path / "inv.json", "-o", tmp_path / "e.pt")
    assert code == 2 and "--save-inverse" in err, err
    # the API: select puts the changed state dict back before choosing the next; each loops
    ck, _ = cs.strip_prefix(cs.load(tmp_path / "gan.pt", key="G"))
    ck, _ = cs.strip_prefix(ck.select("D"))
    assert ck.sd_path == ("D",) and list(ck.state) == ["fc.weight", "fc.bias"]
    assert list(ck.assemble()["G"]) == ["conv.weight", "conv.bias"]
    ck2, reports = cs.load(tmp_path / "gan.pt", key="G").each(["G", "D"], cs.strip_prefix)
    assert list(reports) == ["G", "D"] and ck2.assemble()["G"].keys() == ck.assemble()["G"].keys()
    assert list(ck2.assemble()["D"]) == ["fc.weight", "fc.bias"]
    with pytest.raises(CkptSurgeonError, match="no wrapper"):
        cs.load(tmp_path / "s.pt", key="G").replace(wrapper=None, sd_path=()).select("D")
    # a --key for a file with no wrapper (safetensors, a sharded folder) is said, not ignored
    cs.save(cs.load(tmp_path / "s.pt", key="G"), tmp_path / "g.safetensors")
    code, _, err = cli("strip-prefix", tmp_path / "g.safetensors", "--key", "G", "-o", tmp_path / "e.safetensors")
    assert code == 2 and "a safetensors file: one state dict, no wrapper" in err, err
    cs.save(cs.load(tmp_path / "s.pt", key="G"), tmp_path / "sharded", max_shard_size="40B")
    code, _, err = cli("inspect", tmp_path / "sharded", "--key", "G")
    assert code == 2 and "no wrapper to choose it from" in err and len(err.strip().splitlines()) == 1, err
    assert cli("inspect", tmp_path / "g.safetensors", "--key", "<bare>")[0] == 0


def test_rename_of_a_large_model_prints_a_sample_and_a_dry_run_every_rename(tmp_path, cli):
    """A 7,000-key model printed 7,000 lines per rename; a real run now shows a sample and
    the count, --dry-run (the review) and --json keep every rename."""
    src = tmp_path / "big.pt"
    torch.save({f"module.l{i}.w": torch.zeros(1) for i in range(100)}, src)
    code, out, err = cli("rename", src, "-o", tmp_path / "o.pt", "--map", r"^module\.=>")
    lines = out.splitlines()
    assert code == 0 and "  module.l0.w -> l0.w" in lines and "  ... and 80 more (every rename: --dry-run, or --json)" in lines
    assert sum(" -> " in line for line in lines) == 20 and "100 keys renamed" in lines, out
    code, out, err = cli("rename", src, "-o", tmp_path / "o.pt", "--map", r"^module\.=>", "--dry-run")
    assert code == 0 and sum(" -> " in line for line in out.splitlines()) == 100 and "more" not in out, out
    code, out, err = cli("rename", src, "-o", tmp_path / "o.pt", "--map", r"^module\.=>", "--json")
    assert code == 0 and len(json.loads(out)["mapping"]) == 100
    code, out, err = cli("rename", src, "-o", tmp_path / "o2.pt", "--map", r"^module\.l([0-9])\.=>x\1.")
    assert code == 0 and sum(" -> " in line for line in out.splitlines()) == 10 and "more" not in out, out


def test_report_lines_count_one_in_the_singular(tmp_path, cli):
    sd = OrderedDict([("module.a.weight", torch.ones(2)), ("module.b.weight", torch.ones(3))])
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    code, out, err = cli("extract", path, "--layers", "module.a", "-o", tmp_path / "x.pt")
    assert code == 0, err
    assert "kept 1 tensor (2 parameters" in out and "'module.a': 1 key\n" in out and "(torch-zip, 1 tensor," in out
    code, out, err = cli("rename", path, "--map", r"a\.=>c.", "-o", tmp_path / "r.pt")
    assert code == 0, err
    assert ": 1 key\n" in out and "1 key renamed" in out
    code, out, err = cli("strip-prefix", path, "-o", tmp_path / "s.pt")
    assert code == 0 and "from 2 keys" in out and "(torch-zip, 2 tensors," in out, out + err
    changed = OrderedDict([("module.a.weight", torch.zeros(2)), ("module.c", torch.ones(1))])
    torch.save(changed, tmp_path / "changed.pt")
    code, out, err = cli("diff", path, tmp_path / "changed.pt")
    assert code == 1 and "different: 1 tensor changed, 1 only in A, 1 only in B" in out, out + err
    code, out, err = cli("cast", path, "--dtype", "bf16", "--keep", "module.b", "-o", tmp_path / "c.pt")
    assert code == 0 and "cast 1 tensor float32 -> bfloat16" in out and "left 1 tensor as it is" in out, out + err
    code, _, err = cli("extract", path, "--layers", "nope", "-o", tmp_path / "y.pt")
    assert code == 2 and "layer pattern matched nothing: 'nope'" in err, err
    code, _, err = cli("extract", path, "--layers", "nope,nada", "-o", tmp_path / "y.pt")
    assert code == 2 and "layer patterns matched nothing: 'nope', 'nada'" in err, err
    code, _, err = cli("rename", path, "--map", "zzz=>y", "-o", tmp_path / "y.pt")
    assert code == 2 and "rename rule matched no key: 'zzz'" in err, err
    code, _, err = cli("extract", path, "--layers", "module.a", "--reroot", "module.b", "-o", tmp_path / "y.pt")
    assert code == 2 and "1 extracted key does not start with it" in err, err
    inner = OrderedDict([("enc._orig_mod.l.weight", torch.ones(2)), ("head.weight", torch.ones(2))])
    torch.save(inner, tmp_path / "inner.pt")
    code, out, err = cli("strip-prefix", tmp_path / "inner.pt", "-o", tmp_path / "i.pt")
    assert code == 0 and "dropped inner wrapper component '_orig_mod' (1 key)" in out, out + err
    count = cs.dtypes.count
    assert (count(0, "key"), count(1, "key"), count(12345, "tensor")) == ("0 keys", "1 key", "12,345 tensors")


def test_convert_of_several_state_dicts_to_a_torch_file_keeps_them_all(tmp_path, cli):
    """A torch output keeps the whole wrapper whichever state dict is chosen, so convert (legacy
    to zip, a GPU save re-written) needs no --key there. An output that holds one state dict
    (safetensors, a folder, --state-dict-only) still asks, and says how to keep them all."""
    g = OrderedDict([("net.0.weight", torch.randn(4, 3)), ("net.0.bias", torch.randn(4))])
    d = OrderedDict([("fc.weight", torch.randn(1, 4))])
    torch.save({"G": g, "D": d, "epoch": 7}, tmp_path / "gan.pt", _use_new_zipfile_serialization=False)
    code, out, err = cli("convert", tmp_path / "gan.pt", "-o", tmp_path / "z.pt", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["state_dicts"] == ["G", "D"] and "all kept in their wrapper" in rep["notes"][0], rep
    got = torch.load(tmp_path / "z.pt", weights_only=True, mmap=True)  # a zip file now
    assert list(got) == ["G", "D", "epoch"] and got["epoch"] == 7
    assert all(torch.equal(got["G"][k], v) for k, v in g.items()) and torch.equal(got["D"]["fc.weight"], d["fc.weight"])
    for args, keep in ((["-o", tmp_path / "x.safetensors"], "write a torch file (.pt)"),
                       (["-o", tmp_path / "x.pt", "--state-dict-only"], "leave out --state-dict-only")):
        code, _, err = cli("convert", tmp_path / "gan.pt", *args)
        assert code == 2 and "several state dicts in the checkpoint: G, D" in err and keep in err, err
        assert not os.path.exists(args[1])
    from safetensors.torch import load_file

    code, _, err = cli("convert", tmp_path / "gan.pt", "--key", "D", "-o", tmp_path / "d.safetensors")
    assert code == 0 and list(load_file(tmp_path / "d.safetensors")) == ["fc.weight"], err
