"""Checkpoints saved on a GPU by the libraries that write them in the field (tests/data/gpu, made
by tests/data/make_gpu.py on an H100: torch 2.11 CUDA, DDP over NCCL, torch.compile, FSDP2 + DCP,
Lightning 16-mixed, timm's CheckpointSaver, transformers save_pretrained). Storages say 'cuda:0';
everything must read to CPU on a machine without a GPU, rewrite to files that load there
without map_location, and keep every non-weight entry.

``CKPT_SURGEON_GPU_FIXTURES`` points the tests at another folder made by the same script (the
GPU session runs them on freshly made files before they are committed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptsurgeon as cs

HERE = Path(__file__).resolve().parent
GPU = Path(os.environ.get("CKPT_SURGEON_GPU_FIXTURES") or HERE / "data" / "gpu")
NET = f"{HERE / 'data' / 'make_gpu.py'}:Net"


def _make_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ckpt_make_gpu", HERE / "data" / "make_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_load(path, **kw):
    return torch.load(path, map_location="cpu", weights_only=True, **kw)


def _by_name(d) -> dict:
    """A state dict with its keys sorted (safetensors files keep their keys sorted)."""
    return {k: d[k] for k in sorted(d)}


def _locations(path) -> set[str]:
    """The device names a torch file gives its storages ('cpu', 'cuda:0'), as torch reads them."""
    seen = set()

    def note(storage, location):
        seen.add(location)
        return storage

    torch.load(path, map_location=note, weights_only=True)
    return seen


def test_the_fixtures_were_saved_on_a_gpu():
    assert "cuda:0" in _locations(GPU / "cuda_state_dict.pt")
    assert b"cuda" in (GPU / "cuda_legacy.pt").read_bytes()[:4096]
    assert "H100" in (GPU / "MADE_WITH.txt").read_text() or os.environ.get("CKPT_SURGEON_GPU_FIXTURES")


@pytest.mark.parametrize("name", ["cuda_state_dict.pt", "cuda_legacy.pt", "cuda_tensors.pt", "compile_ddp.pt",
                                  "ddp_compile.pt"])
def test_gpu_saved_tensors_read_to_cpu_and_rewrite_for_cpu(name, tmp_path, same):
    ref = _cpu_load(GPU / name)
    ck = cs.load(GPU / name)
    assert ck.source.lazy and list(ck.state) == list(ref)
    for k, v in ref.items():
        got = ck.state[k].to_torch()
        assert got.device.type == "cpu" and got.dtype == v.dtype and got.stride() == v.stride(), k
        assert torch.equal(got, v), k
    cs.save(ck, tmp_path / "out.pt")
    assert _locations(tmp_path / "out.pt") == {"cpu"}
    out = torch.load(tmp_path / "out.pt", weights_only=True)  # no map_location needed any more
    same(out, ref)
    out = torch.load(tmp_path / "out.pt", weights_only=True, mmap=True)
    same(out, ref)
    if name == "cuda_tensors.pt":  # views keep sharing one storage, as they did on the GPU
        storage = out["weight"].untyped_storage().data_ptr()
        assert all(out[k].untyped_storage().data_ptr() == storage for k in ("weight_t", "rows_2_5", "every_other"))
        assert out["rows_2_5"].storage_offset() == 2 * out["weight"].shape[1]
    cs.save(ck, tmp_path / "out.safetensors")
    same(load_file(tmp_path / "out.safetensors"), {k: v.contiguous() for k, v in ref.items()})


def test_ddp_resume_file_strip_prefix_keeps_optimizer_scaler_and_rng(tmp_path, cli, same):
    Net = _make_gpu().Net
    src = _cpu_load(GPU / "ddp_resume.pt")
    assert src["optimizer_state_dict"]["state"][0]["exp_avg"].numel() > 0
    code, _, err = cli("strip-prefix", GPU / "ddp_resume.pt", "-o", tmp_path / "plain.pt")
    assert code == 0, err
    assert _locations(tmp_path / "plain.pt") == {"cpu"}
    out = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert list(out) == list(src)
    for k in ("epoch", "optimizer_state_dict", "scaler", "loss", "rng"):
        same(out[k], src[k], k)
    net = Net()
    net.load_state_dict(out["model_state_dict"])  # strict
    same(dict(net.state_dict()), {k[len("module."):]: v for k, v in src["model_state_dict"].items()})
    code, stdout, err = cli("verify", GPU / "ddp_resume.pt", tmp_path / "plain.pt", "--model", NET,
                            "--input-shape", "2,3,8,8")
    assert code == 0, stdout + err


@pytest.mark.parametrize("name", ["compile_ddp.pt", "ddp_compile.pt"])
def test_compile_and_ddp_prefix_stacks_strip_in_either_order(name, tmp_path, cli, same):
    code, out, err = cli("inspect", GPU / name)
    assert code == 0 and ("_orig_mod.module." if name.startswith("compile") else "module._orig_mod.") in out, err
    code, _, err = cli("strip-prefix", GPU / name, "-o", tmp_path / "plain.safetensors")
    assert code == 0, err
    model = _cpu_load(GPU / "ddp_resume.pt")["model_state_dict"]
    same(load_file(tmp_path / "plain.safetensors"), {k[len("module."):]: v for k, v in model.items()})


def test_whole_model_saved_on_gpu(tmp_path, cli, same):
    code, _, err = cli("inspect", GPU / "whole_model_cuda.pt")
    assert code == 2 and "__main__.Net" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    expected = torch.load(GPU / "whole_model_cuda.expected.pt", weights_only=True)
    ck = cs.load(GPU / "whole_model_cuda.pt", trust_pickle="inert")
    same(dict(ck.torch_state_dict()), dict(expected))
    code, _, err = cli("convert", GPU / "whole_model_cuda.pt", "--inert-pickle", "-o", tmp_path / "w.safetensors")
    assert code == 0, err
    same(load_file(tmp_path / "w.safetensors"), dict(expected))


def test_fsdp2_dcp_folder_and_torch_saved_dtensors(tmp_path, cli, same):
    expected = torch.load(GPU / "fsdp2.expected.pt", weights_only=True)
    ck = cs.load(GPU / "fsdp2_dcp")
    assert ck.source.format == "dcp" and ck.sd_path == ("model",)
    same(dict(ck.torch_state_dict()), dict(expected))
    ck = cs.load(GPU / "fsdp2_rank0.pt")
    same(dict(ck.torch_state_dict()), dict(expected))
    for src in ("fsdp2_dcp", "fsdp2_rank0.pt"):
        code, _, err = cli("convert", GPU / src, "-o", tmp_path / f"{src}.pt")
        assert code == 0, err
        out = torch.load(tmp_path / f"{src}.pt", weights_only=True)
        sd = out["model"] if src == "fsdp2_dcp" else out
        same(dict(sd), dict(expected))
        if src == "fsdp2_dcp":  # the optimizer's sharded moments come out whole, keyed by name
            assert out["optim"]["state"]["head.weight"]["exp_avg"].shape == expected["head.weight"].shape
            assert out["step"] == 2
    code, stdout, err = cli("verify", GPU / "fsdp2_dcp", GPU / "fsdp2_rank0.pt", "--model", NET,
                            "--input-shape", "2,3,8,8")
    assert code == 0, stdout + err


def test_lightning_mixed_precision_checkpoint_from_gpu(tmp_path, cli, same):
    expected = torch.load(GPU / "lightning_16mixed.expected.pt", weights_only=True)
    ck = cs.load(GPU / "lightning_16mixed.ckpt")
    assert ck.sd_path == ("state_dict",)
    same(dict(ck.torch_state_dict()), dict(expected))
    src = _cpu_load(GPU / "lightning_16mixed.ckpt")
    code, _, err = cli("strip-prefix", GPU / "lightning_16mixed.ckpt", "-o", tmp_path / "s.ckpt")
    assert code == 0, err
    out = torch.load(tmp_path / "s.ckpt", weights_only=True)
    assert list(out) == list(src) and list(out["state_dict"]) == [k[len("model."):] for k in expected]
    for k in src:
        if k != "state_dict":
            same(out[k], src[k], k)


def test_timm_checkpoint_saver_output(tmp_path, cli, same):
    import argparse

    path = GPU / "timm" / "last.pth.tar"
    with torch.serialization.safe_globals([argparse.Namespace]):
        src = _cpu_load(path)
    expected = {"model": src["state_dict"], "ema": src["state_dict_ema"]}
    assert {"optimizer", "amp_scaler", "args", "epoch", "metric"} <= set(src)
    ck = cs.load(path)  # argparse.Namespace args: read by default
    assert ck.sd_path == ("state_dict",) and "state_dict_ema" in ck.candidates
    same(dict(ck.torch_state_dict()), dict(expected["model"]))
    ema = cs.load(path, key="state_dict_ema")
    same(dict(ema.torch_state_dict()), dict(expected["ema"]))
    assert not all(torch.equal(v, expected["model"][k]) for k, v in expected["ema"].items())  # a real EMA
    code, _, err = cli("extract", path, "--layers", "layer1", "-o", tmp_path / "layer1.pth.tar")
    assert code == 0, err
    with torch.serialization.safe_globals([argparse.Namespace]):
        out = torch.load(tmp_path / "layer1.pth.tar", weights_only=True)
    assert set(out["state_dict"]) == {k for k in src["state_dict"] if k.startswith("layer1.")}
    same(out["args"], src["args"])
    code, _, err = cli("convert", path, "--key", "state_dict_ema", "-o", tmp_path / "ema.safetensors")
    assert code == 0, err
    same(load_file(tmp_path / "ema.safetensors"), {k: v.contiguous() for k, v in expected["ema"].items()})
    code, out, err = cli("inspect", path)
    assert code == 0 and "state_dict_ema" in out, err


def test_timm_model_verifies_from_the_saver_file(tmp_path):
    timm = pytest.importorskip("timm")  # torchvision is not importable beside the CPU wheel: GPU image only
    path = GPU / "timm" / "last.pth.tar"
    name = (GPU / "timm" / "model_name.txt").read_text().strip()
    cs.save(cs.load(path, key="state_dict_ema"), tmp_path / "ema.safetensors")
    rep = cs.verify(path, path, model=timm.create_model, model_args={"model_name": name, "num_classes": 10},
                    key_b="state_dict_ema", input_shape=(2, 3, 160, 160), device="auto")
    assert rep["outputs"]  # model and EMA differ after a step: the report measures it
    rep = cs.verify(path, tmp_path / "ema.safetensors", model=timm.create_model,
                    model_args={"model_name": name, "num_classes": 10}, key_a="state_dict_ema",
                    input_shape=(2, 3, 160, 160), device="auto")
    assert rep["equivalent"], rep


@pytest.mark.parametrize("name", ["hf_llama", "hf_gpt2"])
def test_transformers_folders_saved_from_gpu(name, tmp_path, cli):
    pytest.importorskip("transformers")
    expected = torch.load(GPU / f"{name}.expected.pt", weights_only=True)
    ck = cs.load(GPU / name)
    got = dict(ck.torch_state_dict())
    assert set(got) <= set(expected) and len(got) >= len(expected) - 1  # a tied head is saved once
    for k, v in got.items():
        assert v.dtype == expected[k].dtype and torch.equal(v, expected[k]), k
    code, _, err = cli("convert", GPU / name, "-o", tmp_path / "one.safetensors")
    assert code == 0, err
    code, stdout, err = cli("verify", GPU / name, tmp_path / "one.safetensors", "--json")
    assert code == 0, stdout + err


def test_transformers_trainer_checkpoint_folder(tmp_path, cli, same):
    """A Trainer checkpoint-N/ (bf16 on the GPU): the model is what the folder reads as, the training
    state beside it is named, and every file in it reads on its own."""
    pytest.importorskip("transformers")
    folder = GPU / "hf_trainer" / "checkpoint-2"
    expected = torch.load(GPU / "hf_trainer.expected.pt", weights_only=True)
    ck = cs.load(folder)
    same(_by_name(ck.torch_state_dict()), _by_name(expected))
    note = next(n for n in ck.notes if n.startswith("training state beside the weights"))
    assert all(f in note for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"))
    opt = cs.load(folder / "optimizer.pt", key="state/0")  # AdamW moments, saved on the GPU
    src = _cpu_load(folder / "optimizer.pt")
    same(dict(opt.torch_state_dict()), dict(src["state"][0]))
    cs.save(cs.load(folder / "optimizer.pt", key="state/0"), tmp_path / "opt.pt")
    same(torch.load(tmp_path / "opt.pt", weights_only=True), src)  # the whole file, rewritten for the CPU
    rng = cs.load(folder / "rng_state.pth")  # python, numpy (arrays) and CPU/CUDA RNG states: all read
    assert list(rng.state) == ["python", "numpy", "cpu", "cuda"]
    cuda_rng = rng.state["cuda"].to_torch()  # (torch.load wants numpy allowlisted for this file)
    assert cuda_rng.dtype == torch.uint8 and cuda_rng.device.type == "cpu" and cuda_rng.numel() == 16
    from ckptsurgeon.summary import RNG_NOTE, inspect

    assert RNG_NOTE in inspect(folder / "rng_state.pth")["notes"]  # named for what it is
    assert RNG_NOTE not in inspect(folder / "model.safetensors")["notes"]
    code, out, err = cli("scan", folder)
    assert code == 1 and "training_args.bin: UNSAFE" in out and "transformers.training_args.TrainingArguments" in out
    assert "model.safetensors: ok" in out and "optimizer.pt: ok" in out
    code, stdout, err = cli("verify", folder, folder / "model.safetensors")
    assert code == 0, stdout + err


def test_accelerate_save_state_folder(tmp_path, cli, same):
    folder = GPU / "accelerate_state"
    expected = torch.load(GPU / "accelerate_state.expected.pt", weights_only=True)
    ck = cs.load(folder)
    same(_by_name(ck.torch_state_dict()), _by_name(expected))
    note = next(n for n in ck.notes if n.startswith("training state beside the weights"))
    assert "optimizer.bin" in note and "random_states_0.pkl" in note and "scaler.pt" in note
    scaler = _cpu_load(folder / "scaler.pt")  # the AMP GradScaler's state: no tensors, read as it is
    assert cs.summary.inspect(folder / "scaler.pt")["wrapper"]["scale"] == str(scaler["scale"])
    cs.save(cs.load(folder / "optimizer.bin", key="state/0"), tmp_path / "opt.bin")
    same(torch.load(tmp_path / "opt.bin", weights_only=True), _cpu_load(folder / "optimizer.bin"))
    code, out, err = cli("scan", folder)
    assert code == 0, out + err


def test_peft_lora_adapter_folder(tmp_path, cli, same):
    expected = torch.load(GPU / "peft_lora.expected.pt", weights_only=True)
    ck = cs.load(GPU / "peft_lora")
    same(_by_name(ck.torch_state_dict()), _by_name(expected))
    assert "PEFT LORA adapter (r=4, alpha=8; on q_proj, v_proj; for LlamaForCausalLM)" in " ".join(ck.notes)
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in ck.state)
    code, _, err = cli("strip-prefix", GPU / "peft_lora", "--prefix", "base_model.model.", "-o",
                       tmp_path / "lora.safetensors")
    assert code == 0, err
    got = load_file(tmp_path / "lora.safetensors")
    same(_by_name(got), _by_name({k[len("base_model.model."):]: v for k, v in expected.items()}))


def test_lightning_fsdp_sharded_folder_becomes_a_lightning_checkpoint(tmp_path, cli, same):
    """Lightning FSDPStrategy(state_dict_type='sharded') on the GPU writes a folder: DCP files plus
    meta.pt. Read, it is laid out as Lightning's consolidate_checkpoint lays it out (checked by hand
    to be equal, and that load_from_checkpoint and Trainer.fit(ckpt_path=...) accept the output)."""
    folder = GPU / "lightning_fsdp.ckpt"
    expected = torch.load(GPU / "lightning_fsdp.expected.pt", weights_only=True)
    ck = cs.load(folder)
    assert ck.source.format == "dcp" and ck.sd_path == ("state_dict",)
    same(dict(ck.torch_state_dict()), dict(expected))
    code, _, err = cli("convert", folder, "-o", tmp_path / "one.ckpt")
    assert code == 0, err
    out = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert list(out)[:2] == ["state_dict", "optimizer_states"] and "model" not in out
    assert {"epoch", "global_step", "pytorch-lightning_version", "loops", "callbacks", "lr_schedulers",
            "hyper_parameters"} <= set(out)
    same(dict(out["state_dict"]), dict(expected))
    (state,) = out["optimizer_states"]
    assert set(state["state"]) == {k for k in expected if not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked"))}
    code, _, err = cli("strip-prefix", folder, "-o", tmp_path / "stripped.ckpt")
    assert code == 0, err
    assert list(torch.load(tmp_path / "stripped.ckpt", weights_only=True)["state_dict"]) == \
        [k[len("model."):] for k in expected]
