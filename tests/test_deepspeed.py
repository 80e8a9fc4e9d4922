"""DeepSpeed checkpoint folders written by DeepSpeed itself (tests/data/deepspeed, made by
tests/data/make_deepspeed.py: three CPU ranks, tied embedding, float and int buffers, a frozen
layer, two parameter groups). ZeRO-3 weights are put together from the ranks' fp32 partitions
and must equal DeepSpeed's own zero_to_fp32 consolidation, saved beside each folder."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptsurgeon as cs
from ckptsurgeon.errors import CorruptCheckpointError
from ckptsurgeon.byteranges import AssembledBytes

DATA = Path(__file__).resolve().parent / "data" / "deepspeed"
ORDER = ["scale", "steps", "embed.weight", "norm.weight", "norm.bias", "frozen.weight", "frozen.bias",
         "mid.weight", "mid.bias", "up.weight", "head.weight"]  # the model's state_dict order


def _reference(name):
    return torch.load(DATA / f"{name}.zero_to_fp32.pt", weights_only=True)


@pytest.mark.parametrize("name", ["zero3", "zero3_bf16"])
def test_zero3_partitions_are_put_together_like_zero_to_fp32(name, tmp_path, cli, monkeypatch):
    ref = _reference(name)
    for path in (DATA / name, DATA / name / "global_step2"):  # the folder with 'latest', or the tag folder
        ck = cs.load(path)
        assert ck.source.format == "deepspeed-zero3" and ck.source.lazy and list(ck.state) == ORDER
        got = ck.torch_state_dict()
        assert sorted(got) == sorted(ref)
        for k, v in ref.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert ck.state["head.weight"] is ck.state["embed.weight"]  # DeepSpeed's shared_params: still tied
    frozen = "bfloat16" if name.endswith("bf16") else "float32"
    assert ck.state["frozen.weight"].dtype == frozen and ck.state["mid.weight"].dtype == "float32"

    # written from byte ranges of the rank files, never put together in memory
    with monkeypatch.context() as m:
        m.setattr(AssembledBytes, "buffer", lambda self: pytest.fail("assembled in memory"))
        cs.save(cs.load(DATA / name), tmp_path / "api.safetensors")
    assert all(torch.equal(load_file(tmp_path / "api.safetensors")[k], ref[k]) for k in ref if k != "head.weight")
    code, _, err = cli("convert", DATA / name, "-o", tmp_path / "full.pt")
    assert code == 0, err
    full = torch.load(tmp_path / "full.pt", weights_only=True, mmap=True)
    assert list(full) == ORDER and all(torch.equal(full[k], ref[k]) for k in ref)
    assert full["head.weight"].data_ptr() == full["embed.weight"].data_ptr()
    with zipfile.ZipFile(tmp_path / "full.pt") as z:
        assert z.testzip() is None
    code, out, err = cli("diff", DATA / name, tmp_path / "full.pt")
    assert code == 0, out + err
    code, out, err = cli("strip-prefix", DATA / name, "--prefix", "embed.", "--partial", "-o", tmp_path / "s.safetensors")
    assert code == 0 and "weight" in load_file(tmp_path / "s.safetensors"), err
    code, out, _ = cli("inspect", DATA / name)
    assert code == 0 and "deepspeed-zero3" in out and "3 ranks' fp32 partitions" in out


def test_zero2_folder_reads_the_model_states_or_the_fp32_master_weights(tmp_path, cli):
    """ZeRO-1/2 model states hold the whole model in its training dtype: read as they are by
    default; --key fp32 gives the fp32 master weights from the optimizer states instead, equal
    to zero_to_fp32's."""
    ref = _reference("zero2_bf16")
    ck = cs.load(DATA / "zero2_bf16")
    assert ck.source.format == "torch-zip" and ck.sd_path == ("module",)
    assert any("DeepSpeed folder: read global_step2/mp_rank_00_model_states.pt" in n and "--key fp32" in n
               for n in ck.notes)
    got = ck.torch_state_dict()
    assert sorted(got) == sorted(ref) and got["mid.weight"].dtype == torch.bfloat16
    assert torch.equal(got["mid.weight"], ref["mid.weight"].to(torch.bfloat16))
    assert torch.equal(got["steps"], ref["steps"])

    fp32 = cs.load(DATA / "zero2_bf16", key="fp32")
    assert fp32.source.format == "deepspeed-zero2" and list(fp32.state) == ORDER
    got = fp32.torch_state_dict()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in ref.items())
    assert fp32.state["head.weight"] is fp32.state["embed.weight"]
    assert got["frozen.weight"].dtype == torch.bfloat16  # frozen: as saved, like zero_to_fp32
    code, _, err = cli("convert", DATA / "zero2_bf16", "--key", "fp32", "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    out = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(out[k], ref[k]) for k in ref if k != "head.weight")
    assert torch.equal(cs.load(DATA / "zero3", key="fp32").torch_state_dict()["mid.weight"],
                       _reference("zero3")["mid.weight"])


def test_zero3_rank_file_alone_and_broken_folders(tmp_path, cli, flip_byte):
    tag = DATA / "zero3" / "global_step2"
    code, _, err = cli("convert", tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", "-o", tmp_path / "x.pt")
    assert code == 2 and "placeholders" in err and "pass the checkpoint folder" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.pt").exists()

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(DATA / "zero3", dst)
        return dst

    missing = copy("missing")  # a rank's optimizer states lost
    os.unlink(missing / "global_step2" / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    code, _, err = cli("inspect", missing)
    assert code == 2 and "2 optimizer-state files for 3 ranks" in err and len(err.strip().splitlines()) == 1

    damaged = copy("damaged")  # one byte of a rank's fp32 partition flipped: its CRC says so
    optim = damaged / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part = cs.load(damaged).state["mid.weight"].storage.source.parts[1].storage.source
    assert os.path.basename(part.path) == optim.name
    flip_byte(optim, part.offset + 3, 0x55)
    for out in ("d.pt", "d.safetensors"):
        code, _, err = cli("convert", damaged, "-o", tmp_path / out)
        assert code == 2 and "CRC-32 mismatch" in err and not (tmp_path / out).exists(), err
    with pytest.raises(CorruptCheckpointError, match="CRC-32 mismatch"):
        cs.load(damaged).torch_state_dict()

    tp = copy("tensor_parallel")  # a second model-parallel rank: the mp_rank_00 files are a slice only
    os.rename(tp / "global_step2" / "zero_pp_rank_2_mp_rank_00_optim_states.pt",
              tp / "global_step2" / "zero_pp_rank_0_mp_rank_01_optim_states.pt")
    code, _, err = cli("inspect", tp)
    assert code == 2 and "model- or pipeline-parallel" in err and "ds_to_universal" in err

    pp = copy("pipeline")  # pipeline parallel: the layers live in per-layer files
    shutil.copy(DATA / "zero3" / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                pp / "global_step2" / "layer_01-model_00-model_states.pt")
    code, _, err = cli("inspect", pp)
    assert code == 2 and "pipeline-parallel" in err and len(err.strip().splitlines()) == 1

    foreign = copy("foreign")  # a global outside DeepSpeed and torch's allowlist: refused, nothing run
    optim = foreign / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(optim) as z:
        recs = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in recs if n.endswith("/data.pkl"))
    assert b"cdeepspeed.runtime.fp16.loss_scaler\nLossScaler\n" in recs[pkl]
    recs[pkl] = recs[pkl].replace(b"cdeepspeed.runtime.fp16.loss_scaler\nLossScaler\n", b"cfractions\nFraction\n")
    with zipfile.ZipFile(optim, "w") as z:
        for n, data in recs.items():
            z.writestr(n, data)
    code, _, err = cli("convert", foreign, "-o", tmp_path / "f.pt")
    assert code == 2 and "fractions.Fraction" in err and "deepspeed" not in err.split("allowlist:")[-1]


def test_trainer_folder_with_its_own_weights(tmp_path):
    """A Hugging Face Trainer checkpoint-N/ folder: model.safetensors beside the DeepSpeed
    states. The saved model is what the folder means; the tag folder still gives the states."""
    from safetensors.torch import save_file

    run = tmp_path / "checkpoint-2"
    shutil.copytree(DATA / "zero3", run)
    save_file({"embed.weight": torch.ones(11, 6)}, run / "model.safetensors")
    ck = cs.load(run)
    assert ck.source.format == "safetensors" and list(ck.state) == ["embed.weight"]
    assert any("DeepSpeed states are also here (global_step2/)" in n for n in ck.notes)
    assert cs.load(run / "global_step2").source.format == "deepspeed-zero3"


def test_scan_of_folders_reads_the_checkpoint_files(tmp_path, cli):
    """scan of a DeepSpeed folder reads the tag folder's files (DeepSpeed's own classes are
    outside torch's allowlist: reported, exit 1); a model folder's docs and tokenizer are not
    checkpoints and are not reported as errors."""
    code, out, err = cli("scan", DATA / "zero3")
    assert code == 1 and "latest" not in out and out.count("_optim_states.pt: UNSAFE") == 3, out + err
    assert "unsafe global: deepspeed.runtime.zero.config.ZeroStageEnum" in out
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"w": torch.ones(2)}, hf / "model.safetensors")
    torch.save({"w": torch.ones(2)}, hf / "training_args.bin")
    for name, text in (("README.md", "# model"), ("config.json", "{}"), ("tokenizer.model", "\x00sp"),
                       ("merges.txt", "a b")):
        (hf / name).write_text(text)
    code, out, err = cli("scan", hf)
    assert code == 0 and out.count(": ok") == 2 and "README" not in out, out + err
