"""merge-lora against PEFT itself: adapters written by peft's save_pretrained on real
transformers models and plain torch modules, merged here and by ``merge_and_unload()``."""

from __future__ import annotations

import json

import pytest
import torch

import ckptsurgeon as cs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(dtype=torch.float32, tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _adapter(model, folder, **config):
    """A LoRA adapter with non-zero updates (init_lora_weights=False), saved by PEFT."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.25)  # a trained head: not the base's any more
            if "lora_B" in n and n.endswith("bias"):
                p.normal_()
    pm.save_pretrained(str(folder))
    return pm


def _merged_by_peft(base_folder, adapter_folder, loader):
    base = loader(base_folder)
    return peft.PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()


@pytest.mark.parametrize("rslora", [False, True])
def test_llama_linear_embedding_patterns_and_modules_to_save_equal_peft(tmp_path, cli, rslora):
    from safetensors.torch import load_file

    _llama().save_pretrained(tmp_path / "base")
    _adapter(_llama(), tmp_path / "ad", r=4, lora_alpha=8, use_rslora=rslora,
             target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
             rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
             modules_to_save=["lm_head"])
    code, out, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "merged",
                         "--max-shard-size", "5GB")
    assert code == 0, err
    assert "merged LoRA into 7 weights (1 embedding, 6 linear)" in out and "lm_head.weight" in out
    want = _merged_by_peft(tmp_path / "base", tmp_path / "ad", transformers.LlamaForCausalLM.from_pretrained)
    ref = want.state_dict()
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # the same float32 arithmetic: bit for bit
    # the output folder is a model transformers loads, computing what PEFT's merged model computes
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, want(ids).logits, atol=1e-6)
    # the report says what it did, per module
    rep = json.loads(cli("merge-lora", tmp_path / "base", tmp_path / "ad", "--dry-run", "--json")[1])
    scalings = {e["module"]: e["scaling"] for e in rep["merged"]}
    root = (lambda r: r ** 0.5) if rslora else (lambda r: r)
    assert scalings["model.layers.1.mlp.down_proj"] == pytest.approx(8 / root(2))
    assert scalings["model.layers.1.self_attn.q_proj"] == pytest.approx(3 / root(4))
    assert scalings["model.layers.0.self_attn.q_proj"] == pytest.approx(8 / root(4))
    assert rep["replaced"] == ["lm_head.weight", "model.embed_tokens.weight"] and rep["untouched"] == 13


@pytest.mark.parametrize("case", ["conv1d_bias", "tied_embedding"])
def test_gpt2_fan_in_fan_out_lora_bias_and_tied_embeddings(tmp_path, case):
    """GPT-2's Conv1D stores weights transposed (fan_in_fan_out) and lora_bias merges into its
    bias; a LoRA on the token embedding, tied to the head, changes the head too, and the two
    names stay one tensor."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    config = (dict(r=3, lora_alpha=6, fan_in_fan_out=True, target_modules=["c_attn"], lora_bias=True)
              if case == "conv1d_bias" else dict(r=3, lora_alpha=6, target_modules=["wte"]))
    _adapter(transformers.GPT2LMHeadModel(cfg), tmp_path / "ad", **config)
    base = cs.load(tmp_path / "base")
    new, rep = cs.merge_lora(base, tmp_path / "ad")
    cs.save(new, tmp_path / "merged.pt")
    got = torch.load(tmp_path / "merged.pt", weights_only=True)
    want = _merged_by_peft(tmp_path / "base", tmp_path / "ad", transformers.GPT2LMHeadModel.from_pretrained)
    ref = want.state_dict()
    for k, v in got.items():
        assert torch.allclose(v, ref[k], atol=1e-6), k
    if case == "conv1d_bias":
        assert rep["by_kind"] == {"linear": 2} and [e["bias"] for e in rep["merged"]] == [
            "transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
        assert not torch.equal(got["transformer.h.0.attn.c_attn.bias"],
                               base.state["transformer.h.0.attn.c_attn.bias"].to_torch())
    else:
        assert rep["by_kind"] == {"embedding": 1}
        assert not torch.equal(got["transformer.wte.weight"], base.state["transformer.wte.weight"].to_torch())
        # a torch-saved state dict names the tied tensor twice: both names get the merged one
        torch.manual_seed(0)
        torch.save(transformers.GPT2LMHeadModel(cfg).state_dict(), tmp_path / "base.pt")
        new, rep = cs.merge_lora(cs.load(tmp_path / "base.pt"), tmp_path / "ad")
        assert rep["untouched"] == len(new.state) - 2
        cs.save(new, tmp_path / "merged2.pt")
        got = torch.load(tmp_path / "merged2.pt", weights_only=True)
        assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()
        assert torch.allclose(got["lm_head.weight"], ref["transformer.wte.weight"], atol=1e-6)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 6, 1)
        self.c3 = torch.nn.Conv2d(6, 4, (3, 1))  # a kernel that is not square
        self.fc = torch.nn.Linear(4 * 4 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(x)).flatten(1))


def test_conv_lora_on_a_plain_torch_module_to_a_pt_file(tmp_path, cli):
    torch.manual_seed(0)
    torch.save(ConvNet().state_dict(), tmp_path / "base.pt")
    net = ConvNet()
    net.load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
    _adapter(net, tmp_path / "ad", r=2, lora_alpha=5, target_modules=["c1", "c2", "c3", "fc"])
    code, out, err = cli("merge-lora", tmp_path / "base.pt", tmp_path / "ad", "-o", tmp_path / "merged.pt",
                         "--scale", "0.5")
    assert code == 0, err
    assert "at scale 0.5" in out
    half = torch.load(tmp_path / "merged.pt", weights_only=True)
    code, _, err = cli("merge-lora", tmp_path / "base.pt", tmp_path / "ad", "-o", tmp_path / "full.pt")
    assert code == 0, err
    got = torch.load(tmp_path / "full.pt", weights_only=True)

    def loader(path):
        m = ConvNet()
        m.load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
        return m
    want = _merged_by_peft(tmp_path / "base.pt", tmp_path / "ad", loader)
    ref = want.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k
    x = torch.randn(2, 3, 6, 6)
    mine = ConvNet()
    mine.load_state_dict(got)
    with torch.no_grad():
        assert torch.allclose(mine(x), want(x), atol=1e-5)
    base = torch.load(tmp_path / "base.pt", weights_only=True)
    for k in ("c1.weight", "c3.weight", "fc.weight"):  # --scale 0.5: half of each update
        assert torch.allclose(half[k] - base[k], (got[k] - base[k]) / 2, atol=1e-6), k


def test_bfloat16_base_stays_bfloat16_and_close_to_peft(tmp_path):
    from safetensors.torch import load_file

    _llama(torch.bfloat16).save_pretrained(tmp_path / "base")
    _adapter(_llama(torch.bfloat16), tmp_path / "ad", r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    new, _ = cs.merge_lora(cs.load(tmp_path / "base"), tmp_path / "ad")
    cs.save(new, tmp_path / "m.safetensors")
    got = load_file(tmp_path / "m.safetensors")
    ref = _merged_by_peft(tmp_path / "base", tmp_path / "ad",
                          lambda p: transformers.LlamaForCausalLM.from_pretrained(p, dtype=torch.bfloat16)).state_dict()
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16
        # PEFT adds a bfloat16-rounded update; this adds the float32 one and rounds once
        assert torch.allclose(got[k].float(), v.float(), atol=2e-2, rtol=1e-2), k


def test_refusals_are_one_line(tmp_path, cli):
    _llama().save_pretrained(tmp_path / "base")
    _adapter(_llama(), tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "dora", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "DoRA" in err and len(err.strip().splitlines()) == 1
    # an adapter for another model
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    _adapter(_llama(), tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj"])
    code, _, err = cli("merge-lora", tmp_path / "gpt2", tmp_path / "ad", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "the base has no 'model.layers.0.self_attn.q_proj.weight'" in err
    # a config that does not belong to the weights
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    conf = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**conf, "r": 8}))
    code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "rank 2 but the config says r=8" in err
    cfg_path.write_text(json.dumps({**conf, "peft_type": "IA3"}))
    code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "PEFT IA3 adapter" in err
    # numbers that would scale every weight wrongly (a NaN alpha wrote NaN weights), malformed patterns
    for change, words in (({"lora_alpha": float("nan")}, "lora_alpha is nan"), ({"lora_alpha": "x"}, "lora_alpha is 'x'"),
                          ({"rank_pattern": [1, 2]}, "rank_pattern is a list"),
                          ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj'] is None"),
                          ({"target_parameters": 5}, "target_parameters is not a list")):
        cfg_path.write_text(json.dumps({**conf, **change}))
        code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "x.safetensors")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (change, err)
    cfg_path.write_text(json.dumps(conf))
    # the adapter is an input too: writing over it needs --in-place
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "ad" / "adapter_model.safetensors")
    assert code == 2 and "refusing to overwrite the input" in err
    code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "ad", "--max-shard-size", "1GB")
    assert code == 2 and "input's folder" in err
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    cfg_path.unlink()
    code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "no adapter_config.json" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert "Traceback" not in err


def test_adapter_saved_as_bin_merges_the_same(tmp_path):
    """An adapter saved with safe_serialization=False (adapter_model.bin, a torch zip) reads the
    same; the adapter may also be given as its weights file."""
    _llama().save_pretrained(tmp_path / "base")
    pm = _adapter(_llama(), tmp_path / "st", r=4, lora_alpha=16, target_modules=["k_proj", "gate_proj"])
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    base = cs.load(tmp_path / "base")
    a, rep = cs.merge_lora(base, tmp_path / "st")
    b, _ = cs.merge_lora(base, tmp_path / "bin" / "adapter_model.bin")
    assert rep["by_kind"] == {"linear": 4}
    for k in a.state:
        assert torch.equal(a.state[k].to_torch(), b.state[k].to_torch()), k


def test_a_live_peft_state_dict_and_scale_minus_one(tmp_path):
    """A state dict taken from a live PeftModel (adapter names in the keys, the wrapped layers'
    base weights, a modules_to_save wrapper with its original copy) merges like the saved
    adapter; --scale -1 takes a merged adapter back out."""
    from safetensors.torch import save_file

    _llama().save_pretrained(tmp_path / "base")
    pm = _adapter(_llama(), tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    live = {k: v.detach().clone() for k, v in pm.state_dict().items() if "lora_" in k or "modules_to_save" in k
            or "original_module" in k}
    assert any(".lora_A.default.weight" in k for k in live) and any("original_module" in k for k in live)
    (tmp_path / "live").mkdir()
    save_file(live, tmp_path / "live" / "adapter_model.safetensors")
    (tmp_path / "live" / "adapter_config.json").write_text((tmp_path / "ad" / "adapter_config.json").read_text())
    base = cs.load(tmp_path / "base")
    a, _ = cs.merge_lora(base, tmp_path / "ad")
    b, rep = cs.merge_lora(base, tmp_path / "live")
    assert rep["replaced"] == ["lm_head.weight"] and len(rep["merged"]) == 2
    for k in a.state:
        assert torch.equal(a.state[k].to_torch(), b.state[k].to_torch()), k
    cs.save(a, tmp_path / "merged.safetensors")
    back, _ = cs.merge_lora(cs.load(tmp_path / "merged.safetensors"), tmp_path / "ad", scale=-1.0)
    w = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(back.state[w].to_torch(), base.state[w].to_torch(), atol=1e-6)


def test_adapter_written_by_peft_on_a_gpu(tmp_path):
    """tests/data/gpu/peft_lora: a LoRA adapter PEFT 0.21 saved on an H100 (tests/data/make_gpu.py)
    merges into a base of its architecture exactly as this machine's PEFT merges it."""
    import os
    from pathlib import Path

    folder = Path(os.environ.get("CKPT_SURGEON_GPU_FIXTURES", Path(__file__).parent / "data" / "gpu")) / "peft_lora"
    if not folder.is_dir():
        pytest.skip("no GPU-saved fixtures")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    new, rep = cs.merge_lora(cs.load(tmp_path / "base"), folder)
    assert rep["by_kind"] == {"linear": 4} and {e["scaling"] for e in rep["merged"]} == {2.0}
    ref = _merged_by_peft(tmp_path / "base", folder, transformers.LlamaForCausalLM.from_pretrained).state_dict()
    for k, v in new.state.items():
        assert torch.equal(v.to_torch(), ref[k]), k


def test_extract_lora_round_trips_through_peft_and_merge(tmp_path, cli):
    """extract-lora: low-rank changes come out exact (rank >= the change's rank), other changed
    modules whole; PEFT loads the folder onto the base and its merge gives the tuned model back,
    as does merge-lora. A rank below the change's reports the error it leaves."""
    from safetensors.torch import load_file

    base = _llama()
    base.save_pretrained(tmp_path / "base")
    tuned = _llama()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
            w = tuned.get_submodule(name).weight
            w += torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.01
        tuned.model.norm.weight += 0.1  # a norm: kept whole
        tuned.model.embed_tokens.weight[5] += 1.0  # an embedding row: kept whole
    tuned.save_pretrained(tmp_path / "tuned")
    code, out, err = cli("extract-lora", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "--rank", "4")
    assert code == 0, err
    assert "3 changed weights as rank-4 LoRA updates" in out and "model.norm" in out
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["lm_head", "model.layers.0.self_attn.q_proj",
                                                 "model.layers.1.mlp.down_proj"]
    assert sorted(config["modules_to_save"]) == ["model.embed_tokens", "model.norm"]
    want = tuned.state_dict()
    merged = _merged_by_peft(tmp_path / "base", tmp_path / "ad", transformers.LlamaForCausalLM.from_pretrained)
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-5), k
    code, _, err = cli("merge-lora", tmp_path / "base", tmp_path / "ad", "-o", tmp_path / "back.safetensors")
    assert code == 0, err
    back = load_file(tmp_path / "back.safetensors")
    for k, v in want.items():
        assert torch.allclose(back[k], v, atol=1e-5), k
    # a rank below the change's: the report says how much is left out
    adapter, rep = cs.extract_lora(cs.load(tmp_path / "base"), cs.load(tmp_path / "tuned"), rank=1)
    assert 0.3 < rep["max_rel_error"] < 1.0 and all(e["r"] == 1 for e in rep["low_rank"])
    # the same model: nothing to extract; another model: one line
    code, _, err = cli("extract-lora", tmp_path / "base", tmp_path / "base", "-o", tmp_path / "none")
    assert code == 2 and "no change to extract" in err and not (tmp_path / "none").exists()


def test_extract_lora_of_a_non_finite_change_is_one_line(tmp_path, cli):
    base = {"fc.weight": torch.randn(40, 40), "fc.bias": torch.zeros(40)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["fc.weight"][3, 4] = float("nan")
    torch.save(base, tmp_path / "a.pt")
    torch.save(tuned, tmp_path / "b.pt")
    code, _, err = cli("extract-lora", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "ad")
    assert code == 2 and "fc.weight: the difference holds NaN or inf" in err and "internal error" not in err
    assert not (tmp_path / "ad").exists()


def _gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=32, layer_types=["full_attention"])
    return transformers.GptOssForCausalLM(cfg).eval()


def _same_folders(got_folder, want_folder) -> set:
    """The tensor names of two single-file model folders, after asserting they hold the same
    tensors within 1e-6 (ours against PEFT's merge saved by save_pretrained)."""
    from safetensors.torch import load_file

    got, want = load_file(got_folder / "model.safetensors"), load_file(want_folder / "model.safetensors")
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=1e-6), k
    return set(got)


def _qwen3_moe(moe_intermediate=12):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      moe_intermediate_size=moe_intermediate, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                                      num_experts_per_tok=2, head_dim=8, max_position_embeddings=32)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


@pytest.mark.filterwarnings("ignore")
def test_lora_on_expert_parameters_equals_peft(tmp_path, cli):
    """PEFT's target_parameters (LoRA on a bare nn.Parameter: MoE experts stored as one 3-D
    tensor) merge as PEFT merges them: lora_A (E*r, in), lora_B (out, r*E), the update per
    expert einsum('ore,eri->eoi'), or 'eio' where the experts are stored (E, in, out) --
    GPT-OSS (is_transposed, saved under its in-memory names) and Qwen3-MoE's in-memory layout
    (E, out, in); two parameters of one module nest (experts.base_layer.lora_*); a base saved
    under per-expert names (transformers >= 5 splits fused experts when saving) gets each expert's
    part of the update."""
    from safetensors.torch import load_file

    oss = _gpt_oss()
    oss.save_pretrained(tmp_path / "oss")
    _adapter(_gpt_oss(), tmp_path / "oss_ad", r=2, lora_alpha=8, target_modules=["q_proj"],
             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    code, out, err = cli("merge-lora", tmp_path / "oss", tmp_path / "oss_ad", "-o", tmp_path / "oss_m")
    assert code == 0 and "(2 experts_transposed, 1 linear)" in out, out + err
    want = _merged_by_peft(tmp_path / "oss", tmp_path / "oss_ad", transformers.GptOssForCausalLM.from_pretrained)
    got, base = load_file(tmp_path / "oss_m" / "model.safetensors"), oss.state_dict()
    for k, v in want.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=1e-6), k
    assert not torch.equal(got["model.layers.0.mlp.experts.gate_up_proj"], base["model.layers.0.mlp.experts.gate_up_proj"])
    assert not torch.equal(got["model.layers.0.mlp.experts.down_proj"], base["model.layers.0.mlp.experts.down_proj"])

    # Qwen3-MoE keeps (E, out, in) in memory; its own state dict (fused names) as the base
    torch.save(_qwen3_moe().state_dict(), tmp_path / "qwen.pt")
    pm = _adapter(_qwen3_moe(), tmp_path / "qwen_ad", r=2, lora_alpha=4,
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    code, out, err = cli("merge-lora", tmp_path / "qwen.pt", tmp_path / "qwen_ad", "-o", tmp_path / "qwen_m.pt")
    assert code == 0 and "(2 experts)" in out, out + err
    merged_by_peft = pm.merge_and_unload()
    ref = merged_by_peft.state_dict()
    got = torch.load(tmp_path / "qwen_m.pt", weights_only=True)
    for k, v in ref.items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=1e-6), k

    # a square expert matrix fits (E, out, in) and (E, in, out): which one is the module's, not the file's
    torch.save(_qwen3_moe(8).state_dict(), tmp_path / "sq.pt")
    pm_sq = _adapter(_qwen3_moe(8), tmp_path / "sq_ad", r=2, lora_alpha=4,
                     target_parameters=["mlp.experts.gate_up_proj"])
    code, out, err = cli("merge-lora", tmp_path / "sq.pt", tmp_path / "sq_ad", "-o", tmp_path / "sq_m.pt")
    assert code == 2 and "more than one way" in err and len(err.strip().splitlines()) == 1, err
    # transformers saves Qwen3-MoE's fused experts under per-expert names (experts.{e}.gate_proj.weight,
    # .up_proj, .down_proj): the update of expert e goes to its own weights, gate_up's rows split
    _qwen3_moe().save_pretrained(tmp_path / "qwen_folder")
    merged_by_peft.save_pretrained(tmp_path / "qwen_ref")
    code, out, err = cli("merge-lora", tmp_path / "qwen_folder", tmp_path / "qwen_ad", "-o", tmp_path / "q_m")
    assert code == 0 and "(2 experts)" in out, out + err
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in _same_folders(tmp_path / "q_m", tmp_path / "qwen_ref")
    # split this way the square matrix is no longer ambiguous: the file's per-expert Linears say (out, in)
    _qwen3_moe(8).save_pretrained(tmp_path / "sq_folder")
    code, out, err = cli("merge-lora", tmp_path / "sq_folder", tmp_path / "sq_ad", "-o", tmp_path / "sq_f")
    assert code == 0 and "(1 experts)" in out, out + err
    pm_sq.merge_and_unload().save_pretrained(tmp_path / "sq_ref")
    _same_folders(tmp_path / "sq_f", tmp_path / "sq_ref")
    # Mixtral's file: block_sparse_moe.experts.{e}.w1 / w3 / w2 for the fused mlp.experts parameters
    torch.manual_seed(0)
    mix_cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                         num_experts_per_tok=2, max_position_embeddings=32)
    transformers.MixtralForCausalLM(mix_cfg).save_pretrained(tmp_path / "mix")
    mix = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mix")
    pm_mix = _adapter(mix, tmp_path / "mix_ad", r=2, lora_alpha=4, target_modules=["q_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm_mix.merge_and_unload().save_pretrained(tmp_path / "mix_ref")
    code, out, err = cli("merge-lora", tmp_path / "mix", tmp_path / "mix_ad", "-o", tmp_path / "mix_m")
    assert code == 0 and "merged LoRA into 13 weights (2 experts, 1 linear)" in out, out + err
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in _same_folders(tmp_path / "mix_m",
                                                                                  tmp_path / "mix_ref")
    # a base with neither the fused parameter nor per-expert weights: one line
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 16)}, tmp_path / "other.pt")
    code, out, err = cli("merge-lora", tmp_path / "other.pt", tmp_path / "qwen_ad", "-o", tmp_path / "q.pt")
    assert code == 2 and "no targeted parameter" in err and len(err.strip().splitlines()) == 1, err
    assert not any((tmp_path / n).exists() for n in ("sq_m.pt", "q.pt"))


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.mark.filterwarnings("ignore")
def test_diffusers_lora_files_merge_as_diffusers_fuses_them(tmp_path, cli):
    """A diffusers LoRA file (pytorch_lora_weights.safetensors: the LoraConfig in its header;
    tensor and config names prefixed unet./text_encoder. when a pipeline saved it) merges into
    a diffusers model folder as diffusers' fuse_lora does; the pipeline's other component is
    named, not merged; a file without the config gets alpha = rank per module (scale 1), as
    diffusers loads it."""
    pytest.importorskip("diffusers")
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    unet = _tiny_unet
    unet().save_pretrained(tmp_path / "base")
    model = unet()
    torch.manual_seed(1)
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    lora = get_peft_model_state_dict(model)
    config = model.peft_config["default"].to_dict()
    model.save_lora_adapter(tmp_path / "model_level")  # unprefixed names
    # a pipeline's file: unet. and text_encoder. parts, their configs prefixed the same way
    te = {f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_{p}.weight": torch.randn(2, 2)
          for p in "AB"}
    meta = {f"unet.{k}": v for k, v in config.items()}
    meta.update({f"text_encoder.{k}": v for k, v in config.items()})
    (tmp_path / "pipe").mkdir()
    save_file({**{f"unet.{k}": v.contiguous() for k, v in lora.items()}, **te},
              tmp_path / "pipe" / "pytorch_lora_weights.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(meta, default=list)})
    model.fuse_lora()
    model.unload_lora()
    want = model.state_dict()
    for adapter in ("model_level", "pipe"):
        code, out, err = cli("merge-lora", tmp_path / "base", tmp_path / adapter, "-o", tmp_path / f"m_{adapter}")
        assert code == 0 and "merged LoRA into" in out and "scaling (alpha / r): 3" in out, out + err
        assert ("text_encoder" in out) == (adapter == "pipe"), out
        got = load_file(tmp_path / f"m_{adapter}" / "diffusion_pytorch_model.safetensors")
        for k, v in want.items():
            assert torch.allclose(got[k], v, atol=1e-6), k
    # no config in the header (or a .bin, which has none): alpha = rank, scale 1
    save_file({k: v.contiguous() for k, v in lora.items()}, tmp_path / "bare.safetensors")
    (tmp_path / "old").mkdir()
    torch.save(lora, tmp_path / "old" / "pytorch_lora_weights.bin")
    base = load_file(tmp_path / "base" / "diffusion_pytorch_model.safetensors")
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    expected = base[f"{k}.weight"] + lora[f"{k}.lora_B.weight"] @ lora[f"{k}.lora_A.weight"]
    for adapter in (tmp_path / "bare.safetensors", tmp_path / "old"):
        code, out, err = cli("merge-lora", tmp_path / "base", adapter, "-o", tmp_path / "m_bare")
        assert code == 0 and "alpha is its rank" in out and "scaling (alpha / r): 1" in out, out + err
        got = load_file(tmp_path / "m_bare" / "diffusion_pytorch_model.safetensors")
        assert torch.allclose(got[f"{k}.weight"], expected, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_kohya_lora_merges_by_the_base_modules_names(tmp_path, cli):
    """A kohya-ss LoRA (lora_unet_<path_with_underscores>.lora_down/.lora_up/.alpha, the form
    Stable Diffusion LoRAs are shared in) merges into the modules whose paths it names: a diffusers
    folder, or a single file whose names carry a prefix (model.diffusion_model.); the same update
    as diffusers' fuse_lora for the same factors and alpha; a LoCon conv (3x3 down, 1x1 up)
    computes what the LoRA branch computes; a module without .alpha gets scale 1; a name that
    matches no module is refused in one line."""
    pytest.importorskip("diffusers")
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    unet = _tiny_unet
    unet().save_pretrained(tmp_path / "base")
    model = unet()
    torch.manual_seed(1)
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v"], init_lora_weights=False))
    lora = get_peft_model_state_dict(model)
    model.fuse_lora()
    model.unload_lora()
    want = model.state_dict()
    kohya = {}
    for k, v in lora.items():
        mod, _, part = k.partition(".lora_")
        name = "lora_unet_" + mod.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = v.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(6.0, dtype=torch.float16)
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(3, 4, 3, 3, generator=g), torch.randn(8, 3, 1, 1, generator=g)
    kohya["lora_unet_conv_in.lora_down.weight"], kohya["lora_unet_conv_in.lora_up.weight"] = down, up  # no alpha
    # a text encoder's part, as most SD LoRAs carry: for another model, named and left alone
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(2, 12)
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(12, 2)
    save_file(kohya, tmp_path / "kohya.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "base", tmp_path / "kohya.safetensors", "-o", tmp_path / "m")
    assert code == 0 and "merged LoRA into" in out and "1 conv2d" in out and "alpha is its rank" in out, out + err
    assert "updates for lora_te are not for this base" in out, out
    got = load_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    base = load_file(tmp_path / "base" / "diffusion_pytorch_model.safetensors")
    for k, v in want.items():
        if not k.startswith("conv_in."):
            assert torch.allclose(got[k], v, atol=1e-6), k
    x = torch.randn(1, 4, 8, 8, generator=g)
    conv = torch.nn.functional.conv2d
    branch = conv(conv(x, down, padding=1), up)  # the LoRA branch at scale 1 (alpha = rank)
    assert torch.allclose(conv(x, got["conv_in.weight"], padding=1),
                          conv(x, base["conv_in.weight"], padding=1) + branch, atol=1e-4)

    # a single file with the UNet under model.diffusion_model.: matched by the trailing part of each path
    save_file({f"model.diffusion_model.{k}": v for k, v in base.items()}, tmp_path / "single.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "single.safetensors", tmp_path / "kohya.safetensors",
                         "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    one = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(one[f"model.diffusion_model.{k}"], v) for k, v in got.items())

    for bad, words in ((torch.empty(0), "holds 0 values"), (torch.ones(3), "holds 3 values"),
                       (torch.tensor(float("nan")), "alpha is nan")):
        name = next(iter(kohya)).split(".")[0]
        save_file({**kohya, f"{name}.alpha": bad}, tmp_path / "bad_alpha.safetensors")
        code, out, err = cli("merge-lora", tmp_path / "base", tmp_path / "bad_alpha.safetensors", "-o", tmp_path / "m3")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    kohya["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.randn(2, 8)
    kohya["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.randn(8, 2)
    save_file(kohya, tmp_path / "bad.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "base", tmp_path / "bad.safetensors", "-o", tmp_path / "m2")
    assert code == 2 and "lora_unet_no_such_block_to_q matches no module" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m2").exists()


def _sd1_unet():
    """A UNet laid out as Stable Diffusion 1.x's (four blocks, two resnets each, attention in all
    but the last down / first up block), small."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2)


_LDM_CONV_IN = "input_blocks.0.0.weight"


def _as_ldm(sd: dict, per_block: int = 2, attn_up: tuple = (1, 2, 3)) -> dict:
    """diffusers UNet names -> the original LDM UNet's, as a single file holds them (the test's own
    table; the test checks it against diffusers' single-file converter)."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    n = per_block + 1
    for k, v in sd.items():
        p = k.split(".")
        if p[0] in ("down_blocks", "up_blocks"):
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
            if kind == "downsamplers":
                new = [f"input_blocks.{n * (i + 1)}.0.op", *rest[1:]]
            elif kind == "upsamplers":
                new = [f"output_blocks.{n * i + per_block}.{2 if i in attn_up else 1}", *rest]
            else:
                block = f"input_blocks.{n * i + j + 1}" if p[0] == "down_blocks" else f"output_blocks.{n * i + j}"
                new = [block, "1", *rest] if kind == "attentions" else [block, "0", res[rest[0]], rest[1]]
        elif p[0] == "mid_block":
            j = int(p[2])
            new = [f"middle_block.{2 * j + 1}", *p[3:]] if p[1] == "attentions" else \
                [f"middle_block.{2 * j}", res[p[3]], p[4]]
        else:
            new = [top[".".join(p[:-1])], p[-1]]
        out["model.diffusion_model." + ".".join(new)] = v
    return out


@pytest.mark.filterwarnings("ignore")
def test_sd1_kohya_lora_merges_into_a_single_file_checkpoint(tmp_path, cli):
    """An SD 1.x kohya LoRA names UNet modules by their diffusers paths (lora_unet_down_blocks_0_
    attentions_0_...), while an SD 1.x single file (v1-5-pruned.safetensors) holds the original
    LDM UNet (model.diffusion_model.input_blocks.1.1...). Merged into the single file, every
    module -- attention projections, LoCon resnet convs, samplers, conv_in/out, the time
    embedding -- gets exactly the update it gets in the same model's diffusers folder."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file, save_file

    unet = _sd1_unet()
    unet.save_pretrained(tmp_path / "base")
    base = load_file(tmp_path / "base" / "diffusion_pytorch_model.safetensors")
    ldm = _as_ldm(base)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))  # the table agrees with diffusers' converter
    assert set(back) == set(base) and all(torch.equal(back[k], base[k]) for k in base)
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3)  # a single file's VAE beside it
    ldm["model_ema.diffusion_modelinput_blocks00weight"] = ldm[f"model.diffusion_model.{_LDM_CONV_IN}"].clone()  # (flat)
    q_proj = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    ldm[q_proj] = torch.randn(12, 12)  # and its text encoder
    save_file(ldm, tmp_path / "single.safetensors")

    targets = ["down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
               "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
               "mid_block.attentions.0.proj_in", "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",
               "down_blocks.1.resnets.0.conv1", "up_blocks.0.resnets.2.conv_shortcut",
               "up_blocks.2.resnets.1.conv2", "mid_block.resnets.1.time_emb_proj",
               "down_blocks.2.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv", "up_blocks.1.upsamplers.0.conv",
               "conv_in", "conv_out", "time_embedding.linear_1"]
    g = torch.Generator().manual_seed(3)
    kohya = {}
    for t in targets:
        w = base[f"{t}.weight"]
        name = "lora_unet_" + t.replace(".", "_")
        if w.dim() == 4:
            down, up = torch.randn(2, w.shape[1], *w.shape[2:], generator=g), torch.randn(w.shape[0], 2, 1, 1, generator=g)
        else:
            down, up = torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g)
        kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"] = down, up
        kohya[f"{name}.alpha"] = torch.tensor(1.0)
    te_down, te_up = torch.randn(2, 12, generator=g), torch.randn(12, 2, generator=g)
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = te_down
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = te_up
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    save_file(kohya, tmp_path / "sd1_lora.safetensors")

    code, out, err = cli("merge-lora", tmp_path / "base", tmp_path / "sd1_lora.safetensors", "-o", tmp_path / "m")
    assert code == 0 and "updates for lora_te are not for this base" in out, out + err
    want = load_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "single.safetensors", tmp_path / "sd1_lora.safetensors",
                         "-o", tmp_path / "m.safetensors")
    assert code == 0 and "EMA copy of the UNet (model_ema.*, 1 tensor), left as it is" in out, out + err
    got = load_file(tmp_path / "m.safetensors")
    assert set(got) == set(ldm)
    for k, v in _as_ldm(want).items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert torch.allclose(got[q_proj], ldm[q_proj] + 0.5 * te_up @ te_down, atol=1e-5)  # alpha 1, rank 2
    assert torch.equal(got["first_stage_model.encoder.conv_in.weight"], ldm["first_stage_model.encoder.conv_in.weight"])
    changed = {k for k in base if not torch.equal(want[k], base[k])}
    assert changed == {f"{t}.weight" for t in targets}
    # an SD 2.x single file holds its text encoder in OpenCLIP's layout (q/k/v stacked in
    # attn.in_proj_weight, out_proj, mlp.c_fc/c_proj): the lora_te part (Hugging Face CLIP names)
    # merges there exactly as into the same weights under Hugging Face names
    g2 = torch.Generator().manual_seed(4)
    clip = {"attn.in_proj_weight": torch.randn(36, 12, generator=g2), "attn.out_proj.weight": torch.randn(12, 12, generator=g2),
            "mlp.c_fc.weight": torch.randn(48, 12, generator=g2), "mlp.c_proj.weight": torch.randn(12, 48, generator=g2)}
    unet_only = {k: v for k, v in ldm.items() if not k.startswith("cond_stage_model.")}
    sd2 = dict(unet_only, **{f"cond_stage_model.model.transformer.resblocks.0.{k}": v for k, v in clip.items()})
    hf = "cond_stage_model.transformer.text_model.encoder.layers.0."
    sd1 = dict(unet_only, **{f"{hf}self_attn.{p}_proj.weight": clip["attn.in_proj_weight"][12 * i:12 * (i + 1)]
                             for i, p in enumerate("qkv")})
    sd1.update({f"{hf}self_attn.out_proj.weight": clip["attn.out_proj.weight"], f"{hf}mlp.fc1.weight": clip["mlp.c_fc.weight"],
                f"{hf}mlp.fc2.weight": clip["mlp.c_proj.weight"]})
    save_file(sd2, tmp_path / "sd2.safetensors")
    save_file(sd1, tmp_path / "sd1_hf.safetensors")
    te = {k: v for k, v in kohya.items() if not k.startswith("lora_te_")}
    for name, (rows, cols, rank, alpha) in {"self_attn_q_proj": (12, 12, 2, 1.0), "self_attn_v_proj": (12, 12, 3, None),
                                            "self_attn_out_proj": (12, 12, 2, 4.0), "mlp_fc1": (48, 12, 2, 2.0)}.items():
        key = f"lora_te_text_model_encoder_layers_0_{name}"
        te[f"{key}.lora_down.weight"] = torch.randn(rank, cols, generator=g2)
        te[f"{key}.lora_up.weight"] = torch.randn(rows, rank, generator=g2)
        if alpha is not None:
            te[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(te, tmp_path / "te_lora.safetensors")
    outs = {}
    for base_name in ("sd2", "sd1_hf"):
        code, out, err = cli("merge-lora", tmp_path / f"{base_name}.safetensors", tmp_path / "te_lora.safetensors",
                             "-o", tmp_path / f"{base_name}_out.safetensors")
        assert code == 0 and "not for this base" not in out, out + err
        outs[base_name] = load_file(tmp_path / f"{base_name}_out.safetensors")
    a, b = outs["sd2"], outs["sd1_hf"]
    fused = a["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    for i, p in enumerate("qkv"):
        assert torch.allclose(fused[12 * i:12 * (i + 1)], b[f"{hf}self_attn.{p}_proj.weight"], atol=1e-5), p
    assert torch.equal(fused[12:24], clip["attn.in_proj_weight"][12:24])  # k: no update
    assert not torch.equal(fused[:12], clip["attn.in_proj_weight"][:12])
    for mine, theirs in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        assert torch.allclose(a[f"cond_stage_model.model.transformer.resblocks.0.{mine}.weight"], b[f"{hf}{theirs}.weight"],
                              atol=1e-5), mine
    assert all(torch.equal(a[k], b[k]) for k in unet_only)
    # SDXL's single file: lora_te1 -> conditioner.embedders.0 (Hugging Face names), lora_te2 ->
    # conditioner.embedders.1 (OpenCLIP's), each only under its own root
    xl = dict(unet_only, **{k.replace("cond_stage_model.", "conditioner.embedders.0."): v.clone() for k, v in sd1.items()
                            if k.startswith("cond_stage_model.")})
    xl.update({k.replace("cond_stage_model.", "conditioner.embedders.1."): v for k, v in sd2.items()
               if k.startswith("cond_stage_model.")})
    save_file(xl, tmp_path / "xl.safetensors")
    te12 = {k: v for k, v in te.items() if not k.startswith("lora_te_")}
    te12.update({k.replace("lora_te_", prefix): v.clone() for k, v in te.items() if k.startswith("lora_te_")
                 for prefix in ("lora_te1_", "lora_te2_")})
    save_file(te12, tmp_path / "te12.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "xl.safetensors", tmp_path / "te12.safetensors",
                         "-o", tmp_path / "xl_out.safetensors")
    assert code == 0 and "not for this base" not in out, out + err
    c = load_file(tmp_path / "xl_out.safetensors")
    for k, v in a.items():
        if k.startswith("cond_stage_model."):
            assert torch.equal(c[k.replace("cond_stage_model.", "conditioner.embedders.1.")], v), k
    for k, v in b.items():
        if k.startswith("cond_stage_model."):
            assert torch.equal(c[k.replace("cond_stage_model.", "conditioner.embedders.0.")], v), k
    # a LoRA of the text encoder alone merges too
    only_te = {k: v for k, v in te.items() if k.startswith("lora_te_")}
    save_file(only_te, tmp_path / "only_te.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "sd2.safetensors", tmp_path / "only_te.safetensors",
                         "-o", tmp_path / "sd2_te.safetensors")
    assert code == 0, err
    te_only_out = load_file(tmp_path / "sd2_te.safetensors")
    assert all(torch.equal(te_only_out[k], a[k]) for k in a if k.startswith("cond_stage_model."))
    assert all(torch.equal(te_only_out[k], sd2[k]) for k in unet_only)
    # a module the OpenCLIP layout cannot take (a layer it does not have): the part is refused, not
    # left out unsaid; the hint's command merges the rest
    te["lora_te_text_model_encoder_layers_7_mlp_fc2.lora_down.weight"] = torch.randn(2, 48)
    te["lora_te_text_model_encoder_layers_7_mlp_fc2.lora_up.weight"] = torch.randn(12, 2)
    save_file(te, tmp_path / "te_lora7.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "sd2.safetensors", tmp_path / "te_lora7.safetensors",
                         "-o", tmp_path / "sd2_bad.safetensors")
    assert code == 2 and "lora_te updates" in err and "OpenCLIP" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sd2_bad.safetensors").exists()
    code, out, err = cli("extract", tmp_path / "te_lora7.safetensors", "--layers", "re:^lora_unet_",
                         "-o", tmp_path / "parts.safetensors")
    assert code == 0, err
    code, out, err = cli("merge-lora", tmp_path / "sd2.safetensors", tmp_path / "parts.safetensors",
                         "-o", tmp_path / "sd2_unet.safetensors")
    assert code == 0, err
    assert torch.equal(load_file(tmp_path / "sd2_unet.safetensors")[f"model.diffusion_model.{_LDM_CONV_IN}"],
                       got[f"model.diffusion_model.{_LDM_CONV_IN}"])
    # a module this layout does not have is still refused, naming it
    kohya["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.randn(2, 8, 1, 1)
    kohya["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.randn(8, 2, 1, 1)
    save_file(kohya, tmp_path / "bad.safetensors")
    code, out, err = cli("merge-lora", tmp_path / "single.safetensors", tmp_path / "bad.safetensors",
                         "-o", tmp_path / "bad_out.safetensors")
    assert code == 2 and "lora_unet_down_blocks_9_attentions_0_proj_in matches no module" in err, err
