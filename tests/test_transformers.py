"""Real architectures from configs (transformers, a test-only extra; random init, no downloads):
save_pretrained folders (single, sharded, .bin), GPT-2's tied lm_head, verify built from config.json."""

from __future__ import annotations

import json

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
