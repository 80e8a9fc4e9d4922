"""Real architectures from configs (transformers, a test-only extra; random init, no downloads):
save_pretrained folders (single, sharded, .bin), GPT-2's tied lm_head, verify built from config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import ckptsurgeon as cs

import transformers  # a test extra (pyproject [test]): a missing install fails loudly instead of skipping


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def test_gpt2_tied_weights_to_safetensors(tmp_path):
    model = _gpt2()
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    torch.save(sd, tmp_path / "gpt2.pt")
    ck = cs.load(tmp_path / "gpt2.pt")
    rep = cs.save(ck, tmp_path / "gpt2.safetensors")
    assert ["lm_head.weight", "transformer.wte.weight"] in rep["tied"]
    from safetensors.torch import load_file

    fresh = _gpt2()
    fresh.load_state_dict(load_file(tmp_path / "gpt2.safetensors"), strict=True)
    rep = cs.save(ck, tmp_path / "dedup.safetensors", dedupe_tied=True)
    assert "lm_head.weight" not in load_file(tmp_path / "dedup.safetensors")
    # the torch output keeps the tie (one storage)
    cs.save(ck, tmp_path / "again.pt")
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["lm_head.weight"].data_ptr() == again["transformer.wte.weight"].data_ptr()


def test_save_pretrained_folders_load_and_diff(tmp_path):
    model = _bert()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert list((tmp_path / "sharded").glob("*.index.json"))
    ref = model.state_dict()
    for name in ("single", "sharded", "bin"):
        ck = cs.load(tmp_path / name)
        got = ck.torch_state_dict()
        for k, v in got.items():
            assert torch.equal(v, ref[k]), (name, k)
    rep = cs.diff(tmp_path / "single", tmp_path / "sharded")
    assert not rep["differences"]
    index = next((tmp_path / "sharded").glob("*.index.json"))
    assert not cs.diff(index, tmp_path / "bin")["differences"]


def test_verify_builds_from_config_json(tmp_path, cli):
    model = _bert()
    model.save_pretrained(tmp_path / "bert")
    ck = cs.load(tmp_path / "bert")
    new, _ = cs.add_prefix(ck, "module.")
    cs.save(new, tmp_path / "bert_dp.pt")
    code, out, err = cli("verify", tmp_path / "bert", tmp_path / "bert_dp.pt", "--json")
    rep = json.loads(out)
    assert code == 0, err
    assert rep["equivalent"] and rep["outputs"][0]["output"].startswith("output.")
    sd = torch.load(tmp_path / "bert_dp.pt", weights_only=True)
    sd["module.encoder.layer.1.output.dense.weight"] *= 1.05
    torch.save(sd, tmp_path / "bad.pt")
    code, out, err = cli("verify", tmp_path / "bert", tmp_path / "bad.pt", "--json")
    rep = json.loads(out)
    assert code == 1 and rep["first_divergent"] == "encoder.layer.1.output.dense"


def test_extract_encoder_layers_reroot(tmp_path):
    model = _bert()
    model.save_pretrained(tmp_path / "bert")
    new, rep = cs.extract(cs.load(tmp_path / "bert"), [r"re:^encoder\.layer\.0\."], reroot="encoder.layer.0.")
    layer = transformers.models.bert.modeling_bert.BertLayer(model.config)
    cs.save(new, tmp_path / "layer0.safetensors")
    from safetensors.torch import load_file

    layer.load_state_dict(load_file(tmp_path / "layer0.safetensors"), strict=True)
    assert torch.equal(layer.output.dense.weight, model.encoder.layer[0].output.dense.weight)


def test_verify_gpt2_save_pretrained_without_tied_head(tmp_path, cli):
    model = _gpt2()
    model.save_pretrained(tmp_path / "gpt2")  # drops lm_head.weight: tied to transformer.wte.weight
    assert "lm_head.weight" not in cs.load(tmp_path / "gpt2").state
    stripped, _ = cs.add_prefix(cs.load(tmp_path / "gpt2"), "_orig_mod.")
    cs.save(stripped, tmp_path / "compiled.safetensors")
    code, out, err = cli("verify", tmp_path / "gpt2", tmp_path / "compiled.safetensors", "--json")
    assert code == 0, out + err
    assert json.loads(out)["equivalent"]


def test_gpt2_through_a_dcp_folder_computes_the_same(tmp_path):
    """GPT-2 saved with torch.distributed.checkpoint (as FSDP/torchtitan do), converted to one
    safetensors file: a fresh model loaded from it gives the same logits."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "step": 10}, checkpoint_id=str(tmp_path / "step10"))
    ck = cs.load(tmp_path / "step10")
    assert ck.sd_path == ("model",) and ck.wrapper["step"] == 10
    cs.save(ck, tmp_path / "gpt2.safetensors")
    fresh = _gpt2()
    torch.nn.init.zeros_(fresh.transformer.wte.weight)
    fresh.load_state_dict(load_file(tmp_path / "gpt2.safetensors"), strict=True)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


def _llama(tmp_path, shard="40KB"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "llama", max_shard_size=shard)
    return model, tmp_path / "llama"


def test_resharded_folder_loads_with_from_pretrained(tmp_path, cli):
    """A sharded output of a model folder carries the folder's config (and tokenizer, template,
    code) so that from_pretrained loads it."""
    model, folder = _llama(tmp_path)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"training state: not copied")
    code, out, err = cli("convert", folder, "-o", tmp_path / "one", "--max-shard-size", "1GB")
    assert code == 0 and "from the source folder too: config.json, generation_config.json, tokenizer_config.json" \
        in out, out + err
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "one")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_rewriting_a_sharded_folder_in_place_never_mixes_old_and_new(tmp_path, cli, monkeypatch):
    """In place, the input's shards are read while the new ones are written: nothing the earlier
    checkpoint uses is replaced before every new byte is written, and the switch is one rename.
    (Before, a re-shard with the same shard count read a tensor from a shard it had already
    replaced: 'source ended early', and the folder was left broken.)"""
    from ckptsurgeon.formats import hf, hf_write

    model, folder = _llama(tmp_path, shard="20KB")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    before = sorted(p.name for p in folder.iterdir())
    n_before = len([p for p in before if p.startswith("model-")])

    def loads_as_expected():
        sd = cs.load(folder).torch_state_dict()
        assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in expected)

    # a crash while the second new shard is written: the earlier checkpoint is whole, nothing left over
    real = hf_write.st.write_data
    calls = []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(hf_write.st, "write_data", crash_on_second)
    code, _, err = cli("convert", folder, "-o", folder, "--in-place", "--max-shard-size", "30KB")
    assert code == 2 and "no space left" in err.lower()
    # into a new folder: the folder made for it is gone again, and the error names the shard as
    # the user would see it (not its interim name)
    calls.clear()
    code, _, err = cli("convert", folder, "-o", tmp_path / "new_out", "--max-shard-size", "30KB")
    assert code == 2 and "no space left" in err.lower() and "ckpt-surgeon-" not in err, err
    assert re.search(r"new_out/model-00002-of-\d{5}\.safetensors$", err.strip()), err
    assert not (tmp_path / "new_out").exists()
    monkeypatch.setattr(hf_write.st, "write_data", real)
    assert sorted(p.name for p in folder.iterdir()) == before
    loads_as_expected()

    for size in ("30KB", f"{n_before}MB", "1GB", "20KB"):  # other counts, one file, back to shards
        code, _, err = cli("convert", folder, "-o", folder, "--in-place", "--max-shard-size", size)
        assert code == 0, err
        loads_as_expected()
        names = sorted(p.name for p in folder.iterdir())
        assert not any("ckpt-surgeon" in n or n.startswith(".") for n in names), names
        shards = [n for n in names if n.startswith("model")]
        assert shards == ["model.safetensors"] or ("model.safetensors" not in shards and hf.INDEX in shards)
        again = transformers.LlamaForCausalLM.from_pretrained(folder)  # transformers reads the same
        assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())

    # no hard links on this file system: the shards keep their interim names, the index names them
    monkeypatch.setattr(hf_write.os, "link", lambda *a: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    code, _, err = cli("convert", folder, "-o", folder, "--in-place", "--max-shard-size", "30KB")
    assert code == 0, err
    loads_as_expected()
    assert all(".safetensors.ckpt-surgeon-" in v for v in json.loads((folder / hf.INDEX).read_text())["weight_map"].values())
    monkeypatch.undo()
    code, _, err = cli("convert", folder, "-o", folder, "--in-place", "--max-shard-size", "20KB")
    assert code == 0, err  # with hard links again: usual names, the interim ones cleaned up
    loads_as_expected()
    assert not any("ckpt-surgeon" in p.name for p in folder.iterdir())


def test_a_folder_with_a_single_file_and_a_stale_index_reads_as_transformers_does(tmp_path):
    model, folder = _llama(tmp_path, shard="20KB")
    from safetensors.torch import save_file

    sd = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    ck = cs.load(folder)
    assert ck.source.path.endswith("model.safetensors")
    assert any("as transformers would" in n and "model.safetensors.index.json" in n for n in ck.notes)
    again = transformers.LlamaForCausalLM.from_pretrained(folder)
    assert all(torch.equal(ck.state[k].to_torch(), again.state_dict()[k]) for k in sd)


def test_cast_of_a_model_folder_records_the_new_dtype_in_its_config(tmp_path, cli):
    model, folder = _llama(tmp_path, shard="20KB")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    code, out, err = cli("cast", folder, "--dtype", "bfloat16", "-o", tmp_path / "bf16", "--max-shard-size", "1GB")
    assert code == 0 and "config.json: dtype float32 -> bfloat16" in out, err
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert next(again.parameters()).dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v.to(torch.bfloat16)), k
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"  # the input is untouched
    # in place: the folder's own config follows its weights
    code, out, err = cli("cast", folder, "--dtype", "float16", "-o", folder, "--in-place", "--max-shard-size", "20KB")
    assert code == 0, err
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    assert next(transformers.LlamaForCausalLM.from_pretrained(folder, dtype="auto").parameters()).dtype == torch.float16


def _moe():
    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def test_verify_loads_names_that_transformers_converts(tmp_path, cli):
    """transformers >= 5 holds MoE experts fused (one gate_up_proj per layer) and renames some
    layers in memory, but save_pretrained writes the original per-expert names, as older versions
    and the Hub's files have them. verify builds the model from config.json and must load such a
    file the way from_pretrained does (its own conversions), not report every expert missing."""
    model = _moe()
    model.save_pretrained(tmp_path / "moe")
    names = list(cs.load(tmp_path / "moe").state)
    assert any(".experts.0." in k for k in names)  # the per-expert layout on disk
    ddp, _ = cs.add_prefix(cs.load(tmp_path / "moe"), "module.")
    cs.save(ddp, tmp_path / "moe_ddp.pt")
    code, out, err = cli("verify", tmp_path / "moe", tmp_path / "moe_ddp.pt", "--json")
    assert code == 0, out + err
    rep = json.loads(out)
    assert rep["equivalent"]
    sd = torch.load(tmp_path / "moe_ddp.pt", weights_only=True)
    key = next(k for k in sd if "layers.1.mlp.experts.2.down_proj" in k)
    sd[key] = sd[key] * 1.5
    torch.save(sd, tmp_path / "bad.pt")
    code, out, err = cli("verify", tmp_path / "moe", tmp_path / "bad.pt", "--json")
    assert code == 1 and json.loads(out)["first_divergent"].startswith("model.layers.1.mlp"), out
    # what neither way can load is still one clear line naming the keys
    del sd[key]
    torch.save(sd, tmp_path / "short.pt")
    code, out, err = cli("verify", tmp_path / "moe", tmp_path / "short.pt")
    assert code != 0 and "does not load strictly" in err and "Traceback" not in err, err


def test_load_partial_and_check_through_transformers_conversions(tmp_path, cli):
    """A per-expert (original-layout) checkpoint loaded partially into a transformers >= 5 model
    whose experts are fused: matched through transformers' own conversions, the fused expert
    tensors loaded with exactly the file's values; a backbone-only file still loads plainly."""
    model = _moe()
    model.save_pretrained(tmp_path / "moe")
    ck = cs.load(tmp_path / "moe")
    fresh = _moe()
    torch.manual_seed(1)
    for p in fresh.parameters():
        torch.nn.init.normal_(p)
    rep = cs.load_partial(fresh, ck, layers=["model.layers.1"], min_match=1.0)
    assert rep["fraction"] == 1.0 and "converted by transformers" in rep["alignment"], rep["alignment"]
    for k, v in model.state_dict().items():
        if k.startswith("model.layers.1."):
            assert torch.equal(fresh.state_dict()[k], v), k
    assert not torch.equal(fresh.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj)
    (tmp_path / "m.py").write_text("import sys\nsys.path.insert(0, %r)\nfrom test_transformers import _moe\n\n"
                                   "def moe():\n    return _moe()\n" % str(Path(__file__).parent))
    code, out, err = cli("check", tmp_path / "moe", "--model", f"{tmp_path / 'm.py'}:moe", "--json")
    assert code == 0, out + err
    assert json.loads(out)["fraction"] == 1.0
    # a file holding only the attention weights, by their (unchanged) names: the plain path
    part, _ = cs.extract(ck, ["re:self_attn"])
    rep = cs.load_partial(_moe(), part, layers=["re:self_attn"], min_match=1.0)
    assert rep["alignment"] == "as is" and rep["fraction"] == 1.0


def test_verify_of_a_folder_transformers_cannot_build_is_one_line(tmp_path, cli):
    """A config.json transformers does not know, or one that needs another library (timm's hub
    folders map to TimmWrapper, which imports timm): one line naming the file and --model, not
    'internal error'."""
    import importlib.util

    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    save_file({"conv.weight": torch.randn(2, 3, 1, 1)}, str(tmp_path / "m" / "model.safetensors"))
    configs = [{"model_type": "no_such_model_xyz"}, {"architecture": "no_such_timm_model_xyz"}]
    if importlib.util.find_spec("timm") is None:  # timm hub folders, built by timm: here without it
        configs += [{"architecture": "resnet18"},
                    {"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": {"input_size": [3, 8, 8]}}]
    for cfg in configs:
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
        code, out, err = cli("verify", tmp_path / "m", tmp_path / "m" / "model.safetensors")
        assert code == 2 and "config.json" in err and "--model" in err and "internal" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        if "architecture" in cfg:
            assert "timm" in err, err


def test_verify_of_a_timm_hub_folder_builds_the_model_with_timm(tmp_path, cli):
    """A timm model on the Hugging Face Hub is a folder of config.json (architecture, num_classes,
    pretrained_cfg with the input size) and model.safetensors under timm's own names: verify builds
    it with timm.create_model as timm's hub loader does, at the input size the config declares
    (a ViT accepts no other). transformers would build a TimmWrapper whose names differ."""
    timm = pytest.importorskip("timm")  # not importable beside the CPU wheel (torchvision): GPU image
    from safetensors.torch import save_file

    for arch, size in (("resnet18", 64), ("vit_tiny_patch16_224", 224)):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=7)
        folder = tmp_path / arch
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        cfg = {"architecture": arch, "num_classes": 7, "num_features": model.num_features,
               "pretrained_cfg": {"input_size": [3, size, size], "num_classes": 1000}}
        (folder / "config.json").write_text(json.dumps(cfg))
        code, out, err = cli("cast", folder, "-o", tmp_path / f"{arch}_bf16.safetensors", "--dtype", "bfloat16")
        assert code == 0, err
        code, out, err = cli("verify", folder, folder / "model.safetensors", "--json")
        assert code == 0 and json.loads(out)["equivalent"], out + err
        assert json.loads(out)["outputs"][0]["shape"] == [2, 7]
        code, out, err = cli("verify", folder, tmp_path / f"{arch}_bf16.safetensors", "--dtype", "bfloat16", "--json")
        assert code == 0 and json.loads(out)["equivalent"], out + err
        if arch == "resnet18":  # fold-bn builds the model from the folder too
            code, out, err = cli("fold-bn", folder, "-o", tmp_path / "folded.safetensors", "--json")
            assert code == 0 and len(json.loads(out)["folded"]) == 20, out + err
            code, out, err = cli("verify", folder, tmp_path / "folded.safetensors", "--json")
            assert code == 0 and json.loads(out)["equivalent"], out + err


def test_verify_takes_the_input_size_a_vision_config_declares(tmp_path, cli):
    """A ViT checks its input against config.image_size: the shape guessed from its first conv
    (32 per side) failed; the declared num_channels x image_size is used now."""
    cfg = transformers.ViTConfig(image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    code, out, err = cli("verify", tmp_path / "vit", tmp_path / "vit", "--json")
    assert code == 0 and json.loads(out)["equivalent"], out + err
    assert json.loads(out)["outputs"][0]["shape"] == [2, 3]


def test_verify_never_calls_what_config_architectures_names_unless_a_model_class(tmp_path):
    """config.json's "architectures" is looked up in transformers by name: only a PreTrainedModel
    class is built from it; any other name (here the pipeline() function, which was called with the
    config) falls back to AutoModel."""
    model = _bert()
    model.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["architectures"] = ["pipeline"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    rep = cs.verify(tmp_path / "b", tmp_path / "b")
    assert rep["equivalent"]


def _hub_cache(repo, src, commit: str, main: bool = True):
    """``src``'s files laid out as huggingface_hub caches a download: blobs named by their hash,
    ``snapshots/<commit>/`` of symlinks into ``../../blobs/``, ``refs/main`` naming the commit."""
    import hashlib
    import os

    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snap


def test_hugging_face_cache_snapshot_with_symlinked_shards(tmp_path, cli):
    """huggingface_hub's cache keeps every file of a snapshot as a symlink into ../../blobs/. The
    index check resolved symlinks, so every sharded model downloaded from the Hub was refused
    ("points outside the folder"). Names are checked now (no absolute path, no '..'), not where
    the user's own symlinks lead; an index naming ../ is still refused."""
    import os

    model, src = _llama(tmp_path)
    snap = _hub_cache(tmp_path / "hub" / "models--org--tiny", src, "abc123")
    assert len(list(snap.glob("*.safetensors"))) > 1 and (snap / "model.safetensors.index.json").is_symlink()
    rep = cs.diff(src, snap)
    assert rep["identical"], rep["verdict"]
    code, out, err = cli("verify", src, snap)
    assert code == 0, out + err
    code, out, err = cli("convert", snap, "-o", tmp_path / "one.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    got = load_file(tmp_path / "one.safetensors")
    assert all(torch.equal(got[k], v) for k, v in cs.load(src).torch_state_dict().items())
    # the index itself still may not name a file outside its folder
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../blobs/" + os.readlink(snap / index["weight_map"][first]).split("/")[-1]
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out, err = cli("inspect", snap)
    assert code == 2 and "points outside the folder" in err, err


def test_hugging_face_cache_repo_folder_reads_its_snapshot(tmp_path, cli, monkeypatch):
    """The folder people find under ~/.cache/huggingface/hub is the repo's, models--org--name/,
    not a snapshot: it was refused ("a directory without a weights index"). It now reads as the
    snapshot refs/main names (or the only one), with a note; several and none named is an error
    listing them, and refs/main can only name a snapshot that is there."""
    model, src = _llama(tmp_path)
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = _hub_cache(repo, src, "abc123def4567890")
    code, out, err = cli("convert", repo, "-o", tmp_path / "one.safetensors")
    assert code == 0, err
    assert "Hugging Face cache of org/tiny: read snapshot abc123def456 (refs/main)" in err
    from safetensors.torch import load_file

    got = load_file(tmp_path / "one.safetensors")
    assert all(torch.equal(got[k], v) for k, v in cs.load(snap).torch_state_dict().items())
    assert cs.diff(repo, src)["identical"]
    # a second snapshot (an older revision): refs/main still decides
    (repo / "snapshots" / "0ld").mkdir()
    assert list(cs.load(repo).state) == list(cs.load(snap).state)
    # refs/main pointing nowhere (or outside): with two snapshots, neither is guessed
    (repo / "refs" / "main").write_text("../../../elsewhere")
    code, out, err = cli("inspect", repo)
    assert code == 2 and "2 snapshots and no refs/main naming one of them: 0ld, abc123def4567890" in err, err
    (repo / "snapshots" / "0ld").rmdir()
    code, out, err = cli("inspect", repo)
    assert code == 0 and "read snapshot abc123def456 (its only snapshot)" in out + err, out + err
    # a PEFT adapter repo in the cache merges from its repo folder too
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=2, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "ad"))
    _hub_cache(tmp_path / "hub" / "models--org--tiny-lora", tmp_path / "ad", "feed")
    code, out, err = cli("merge-lora", repo, tmp_path / "hub" / "models--org--tiny-lora", "--dry-run")
    assert code == 0 and "merged LoRA into 2 weights" in out, out + err
    # and by repo id, from the cache huggingface_hub uses (nothing downloaded)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, out, err = cli("merge-lora", "org/tiny", "org/tiny-lora", "--dry-run")
    assert code == 0 and "merged LoRA into 2 weights" in out and "Hugging Face cache of org/tiny" in err, out + err
    code, out, err = cli("scan", "org/tiny")
    assert code == 0 and out.count(": ok") == len(list(snap.glob("*.safetensors"))) > 1, out + err
    code, out, err = cli("inspect", "org/not-downloaded")
    assert code == 2 and f"not in the local cache ({tmp_path / 'hub'}): download it first (huggingface-cli " \
                         "download org/not-downloaded)" in err, err
    code, out, err = cli("inspect", "runs/last.ckpt")  # a missing file is not taken for a repo id
    assert code == 2 and err.strip() == "ckpt-surgeon: error: runs/last.ckpt: no such file or directory", err


def test_accelerate_folder_with_two_models_names_the_second(tmp_path, cli):
    """accelerate's save_state writes one file per prepared model (model.safetensors,
    model_1.safetensors, ...): the folder reads as the first, and the others are named, not
    silently ignored."""
    from safetensors.torch import save_file

    (tmp_path / "state").mkdir()
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "state" / "model.safetensors"))
    save_file({"d.weight": torch.ones(3)}, str(tmp_path / "state" / "model_1.safetensors"))
    torch.save({"state": {}, "param_groups": []}, tmp_path / "state" / "optimizer.bin")
    ck = cs.load(tmp_path / "state")
    assert list(ck.state) == ["a.weight"]
    assert any("model_1.safetensors" in n and "not read" in n for n in ck.notes), ck.notes
    code, out, err = cli("inspect", tmp_path / "state" / "model_1.safetensors")
    assert code == 0 and "tensors: 1" in out


def test_fold_bn_of_a_model_folder_needs_no_model_option(tmp_path, cli):
    """fold-bn and verify build the model from the folder's config.json (as verify already did),
    so a Hugging Face (or timm) folder is folded and checked without --model."""
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(cfg)
    for m in model.modules():  # trained-looking statistics, so the fold changes the weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.save_pretrained(tmp_path / "resnet")
    code, out, err = cli("fold-bn", tmp_path / "resnet", "-o", tmp_path / "folded.safetensors", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["folded"]) >= 4
    # its quick check compares ModelOutputs (logits), not only bare tensors: before, it was skipped
    assert rep["check"]["relative_error"] < 1e-5, rep.get("check_skipped")
    code, out, err = cli("verify", tmp_path / "resnet", tmp_path / "folded.safetensors", "--json")
    assert code == 0 and json.loads(out)["equivalent"], out + err
    # a lone file has no config to build from: one line naming the option
    code, _, err = cli("fold-bn", tmp_path / "folded.safetensors", "-o", tmp_path / "again.safetensors")
    assert code == 2 and "fold-bn needs --model" in err, err


def test_bn_to_gn_calibrates_a_model_folder_without_a_model_option(tmp_path, cli):
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(cfg).save_pretrained(tmp_path / "resnet")
    code, out, err = cli("bn-to-gn", tmp_path / "resnet", "-o", tmp_path / "gn.safetensors", "--groups", "4", "--groups-policy", "nearest",
                         "--calibrate", "8", "--input-shape", "3,32,32", "--json")
    assert code == 0 and json.loads(out)["calibrated"], out + err
    code, _, err = cli("bn-to-gn", tmp_path / "gn.safetensors", "-o", tmp_path / "x.safetensors", "--calibrate", "8")
    assert code == 2 and "--calibrate needs --model" in err, err


def test_fold_bn_of_a_model_whose_names_transformers_converts(tmp_path, cli):
    """transformers >= 5 renames Segformer in memory (encoder.block.0.0 -> stages.0.blocks.0...)
    while save_pretrained writes the original names. B of a fold-bn then loads through
    transformers' own conversion into a model built from the config -- which still has the
    BatchNorm and no fused bias: the converted tensors plus the ones it did not take must now load
    the folded model strictly (before: 'does not load strictly', and the quick check skipped)."""
    cfg = transformers.SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[16],
                                       num_attention_heads=[1], decoder_hidden_size=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(cfg)
    model.decode_head.batch_norm.running_mean.uniform_(-1, 1)
    model.decode_head.batch_norm.running_var.uniform_(0.5, 2)
    model.save_pretrained(tmp_path / "seg")
    code, out, err = cli("fold-bn", tmp_path / "seg", "-o", tmp_path / "folded.safetensors", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert [p["bn"] for p in rep["folded"]] == ["decode_head.batch_norm"]
    assert rep["check"]["relative_error"] < 1e-5, rep.get("check_skipped")
    code, out, err = cli("verify", tmp_path / "seg", tmp_path / "folded.safetensors", "--json")
    assert code == 0 and json.loads(out)["equivalent"], out + err


def test_diffusers_model_folder_keeps_the_names_diffusers_loads(tmp_path, cli):
    """A diffusers model folder (diffusion_pytorch_model*.safetensors, config.json with
    _class_name) written back as a folder keeps diffusers' names: transformers' model.safetensors
    is a file diffusers' from_pretrained does not look for. An output path without an extension
    is a folder when the input was one (as save_pretrained writes), a torch file otherwise."""
    diffusers = pytest.importorskip("diffusers")  # a test extra; skipped only where it cannot be imported

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet", max_shard_size="40KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    code, out, err = cli("cast", tmp_path / "unet", "--dtype", "bfloat16", "-o", tmp_path / "bf16")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "bf16").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16)
    for k, v in unet.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16)), k
    for limit, n in (("30KB", None), ("1GB", 1), ("60KB", None)):  # re-written in the same folder
        code, out, err = cli("convert", tmp_path / "unet", "-o", tmp_path / "re", "--max-shard-size", limit)
        assert code == 0, err
        names = sorted(p.name for p in (tmp_path / "re").iterdir())
        weights = [x for x in names if x != "config.json"]
        assert all(x.startswith("diffusion_pytorch_model") for x in weights), names
        if n == 1:
            assert weights == ["diffusion_pytorch_model.safetensors"]
        else:
            assert "diffusion_pytorch_model.safetensors.index.json" in weights and len(weights) > 2
        again = diffusers.UNet2DModel.from_pretrained(tmp_path / "re")
        for k, v in unet.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
    # a single file read from outside a model folder: an extension-less output stays a torch file
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    code, out, err = cli("convert", tmp_path / "unet.pt", "-o", tmp_path / "plain")
    assert code == 0 and (tmp_path / "plain").is_file(), err


def test_verify_builds_diffusers_models_from_their_folder(tmp_path, cli):
    """verify of two diffusers model folders needs no option: the model is built with diffusers
    from config.json (_class_name), run at its declared in_channels x sample_size with the seeded
    timestep and encoder_hidden_states its forward requires."""
    diffusers = pytest.importorskip("diffusers")

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    code, out, err = cli("convert", tmp_path / "unet", "-o", tmp_path / "copy", "--max-shard-size", "50KB")
    assert code == 0, err
    code, out, err = cli("verify", tmp_path / "unet", tmp_path / "copy")
    assert code == 0 and "EQUIVALENT" in out and "[2, 4, 8, 8]" in out, out + err
    sd = dict(unet.state_dict())
    k = "conv_in.weight"
    sd[k] = sd[k] + 0.05
    changed = diffusers.UNet2DConditionModel.from_config(unet.config)
    changed.load_state_dict(sd)
    changed.save_pretrained(tmp_path / "changed")
    code, out, err = cli("verify", tmp_path / "unet", tmp_path / "changed")
    assert code == 1 and "NOT EQUIVALENT" in out and "conv_in" in out, out + err
    # a config naming something diffusers has that is not a model class is never called
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    cfg["_class_name"] = "DDPMScheduler"
    (tmp_path / "copy" / "config.json").write_text(json.dumps(cfg))
    code, out, err = cli("verify", tmp_path / "copy", tmp_path / "unet")
    assert code == 2 and "not a diffusers model class" in err and len(err.strip().splitlines()) == 1, err
