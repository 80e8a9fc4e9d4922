"""cast: floating-point tensors to another dtype, one tensor at a time, ties kept."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptsurgeon as cs


def test_cast_to_bfloat16_matches_torch_and_keeps_the_rest(tmp_path, cli, same):
    torch.manual_seed(0)
    sd = OrderedDict([("enc.weight", torch.randn(8, 4)), ("enc.norm.weight", torch.randn(8)),
                      ("bn.running_mean", torch.randn(8)), ("bn.num_batches_tracked", torch.tensor(7)),
                      ("pos", torch.arange(5)), ("table", torch.randn(3, dtype=torch.float64))])
    save_file(sd, tmp_path / "fp32.safetensors")
    code, out, err = cli("cast", tmp_path / "fp32.safetensors", "--dtype", "bfloat16", "-o", tmp_path / "bf16.safetensors")
    assert code == 0, err
    assert "cast 3 tensors float32 -> bfloat16" in out and "cast 1 tensor float64 -> bfloat16" in out
    got = load_file(tmp_path / "bf16.safetensors")
    expected = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sd.items()}
    same(dict(sorted(got.items())), dict(sorted(expected.items())))

    # --keep leaves norms alone; --only restricts the source dtypes
    new, rep = cs.cast(cs.load(tmp_path / "fp32.safetensors"), "float16", keep=["*norm*"], only=["float32"])
    assert new.state["enc.norm.weight"].dtype == "float32" and new.state["table"].dtype == "float64"
    assert new.state["enc.weight"].dtype == "float16" and rep["left"]["kept by --keep"] == 1
    assert rep["bytes_after"] < rep["bytes_before"]


def test_cast_keeps_ties_and_the_wrapper(tmp_path, same):
    torch.manual_seed(0)
    emb = torch.randn(10, 4)
    model = OrderedDict([("wte.weight", emb), ("lm_head.weight", emb), ("ln.weight", torch.ones(4)),
                         ("scale", torch.nn.Parameter(torch.full((2,), 0.5)))])
    opt = {"state": {0: {"exp_avg": torch.randn(10, 4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({"epoch": 3, "model_state_dict": model, "optimizer_state_dict": opt}, tmp_path / "resume.pt")
    new, rep = cs.cast(cs.load(tmp_path / "resume.pt"), "bfloat16")
    cs.save(new, tmp_path / "resume_bf16.pt")
    out = torch.load(tmp_path / "resume_bf16.pt", weights_only=True)
    sd = out["model_state_dict"]
    assert sd["wte.weight"].dtype == torch.bfloat16 and torch.equal(sd["wte.weight"], emb.to(torch.bfloat16))
    assert sd["lm_head.weight"].data_ptr() == sd["wte.weight"].data_ptr()  # still one storage
    assert isinstance(sd["scale"], torch.nn.Parameter) and sd["scale"].dtype == torch.bfloat16
    assert out["epoch"] == 3 and rep["wrapper_untouched"] == ["epoch", "optimizer_state_dict"]  # not the state dict itself
    same(out["optimizer_state_dict"], opt)  # optimizer state: not the state dict, left as it was


def test_cast_then_verify_in_that_dtype_is_exact(sample_dir, tmp_path, models_py, cli):
    """Cast to bfloat16: run in bfloat16, the cast file computes exactly what the original does."""
    code, _, err = cli("cast", sample_dir / "seednet.pt", "--dtype", "bfloat16", "-o", tmp_path / "bf16.pt")
    assert code == 0, err
    code, out, err = cli("verify", sample_dir / "seednet.pt", tmp_path / "bf16.pt", "--model",
                         f"{models_py}:seednet", "--dtype", "bfloat16", "--json")
    assert code == 0, out + err
    import json

    assert json.loads(out)["outputs"][0]["max_abs"] == 0


def test_dtypes_as_people_type_them(sample_dir, tmp_path, models_py, cli):
    """bf16, fp16, half, torch.float32: accepted by the CLI and the API; anything else refused in one line."""
    save_file({"w": torch.randn(3), "h": torch.randn(2).half(), "i": torch.arange(2)}, tmp_path / "a.safetensors")
    code, _, err = cli("cast", tmp_path / "a.safetensors", "--dtype", "bf16", "--only", "FP32", "-o", tmp_path / "b.safetensors")
    assert code == 0, err
    out = load_file(tmp_path / "b.safetensors")
    assert (out["w"].dtype, out["h"].dtype, out["i"].dtype) == (torch.bfloat16, torch.float16, torch.int64)
    new, rep = cs.cast(cs.load(tmp_path / "a.safetensors"), "torch.half")
    assert rep["dtype"] == "float16" and new.state["w"].dtype == "float16"
    code, _, err = cli("cast", tmp_path / "a.safetensors", "--dtype", "int8", "-o", tmp_path / "c.safetensors")
    assert code == 2 and "'int8' is not one of" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("verify", sample_dir / "seednet.pt", sample_dir / "seednet.pt", "--model",
                         f"{models_py}:seednet", "--dtype", "fp64", "--json")
    assert code == 0, out + err


def test_cast_with_nothing_to_do_is_an_error(tmp_path, cli):
    save_file({"pos": torch.arange(4), "w": torch.randn(2).bfloat16()}, tmp_path / "a.safetensors")
    code, _, err = cli("cast", tmp_path / "a.safetensors", "--dtype", "bfloat16", "-o", tmp_path / "b.safetensors")
    assert code == 2 and "no tensor to cast to bfloat16 (1 int64, not cast, 1 already bfloat16)" in err
    assert not (tmp_path / "b.safetensors").exists() and len(err.strip().splitlines()) == 1
    code, _, err = cli("cast", tmp_path / "a.safetensors", "--dtype", "float16", "--keep", "nothing_here",
                       "-o", tmp_path / "b.safetensors")
    assert code == 2 and "--keep pattern matched nothing: 'nothing_here'" in err


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc")
def test_tensors_built_one_by_one_do_not_pile_up_in_memory(tmp_path):
    """glibc keeps freed blocks; a writer that builds tensor after tensor must hand them back
    (give_back_freed_memory): casting 512 MiB of float32 to float16 writes 256 MiB in 2 MiB
    tensors, and the process's own memory may grow by a few tensors, not by the output (without
    the trim: by ~250 MiB). In a fresh process: what malloc keeps depends on the heap's history
    (blocks over 32 MiB are always mapped and unmapped, so a float64 cast never showed it)."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    save_file({f"l{i}.weight": torch.full((1024, 1024), i / 7) for i in range(128)}, tmp_path / "m.safetensors")
    script = """
import sys, ckptsurgeon as cs
def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) // 1024
new, _ = cs.cast(cs.load(sys.argv[1]), "float16")
new.state[next(iter(new.state))].to_torch()  # torch imported and warmed before the start
start = anon_mib()
peak = [start]
cs.save(new, sys.argv[2], progress=lambda n: peak.__setitem__(0, max(peak[0], anon_mib())))
print(peak[0] - start)
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.safetensors"), str(tmp_path / "m16.safetensors")],
                         capture_output=True, text=True, check=True, env={**os.environ, "CKPT_SURGEON_FSYNC": "0"})
    grew = int(out.stdout.split()[-1])
    assert grew < 150, f"anonymous memory grew by {grew} MiB writing 256 MiB"


def test_cast_keeps_the_scales_of_float8_weights(tmp_path, cli):
    """An FP8 checkpoint (DeepSeek-V3 style: float8_e4m3fn weights, float32 weight_scale_inv
    beside them): a bfloat16 cast of the rest leaves the fp8 weights and their scales as stored --
    a scale rounded to bfloat16 changes every value it dequantizes."""
    from safetensors.torch import load_file, save_file

    scale = torch.tensor([[1.000123, 0.5]], dtype=torch.float32)
    save_file({"layers.0.mlp.weight": torch.randn(4, 4).to(torch.float8_e4m3fn),
               "layers.0.mlp.weight_scale_inv": scale,
               "layers.0.norm.weight": torch.ones(4),
               "lm_head.weight": torch.randn(4, 4)}, str(tmp_path / "fp8.safetensors"))
    new, rep = cs.cast(cs.load(tmp_path / "fp8.safetensors"), "bfloat16")
    assert rep["left"]["quantization data of a quantized weight"] == 1
    cs.save(new, tmp_path / "out.safetensors")
    got = load_file(tmp_path / "out.safetensors")
    assert got["layers.0.mlp.weight_scale_inv"].dtype == torch.float32
    assert torch.equal(got["layers.0.mlp.weight_scale_inv"], scale)
    assert got["layers.0.mlp.weight"].dtype == torch.float8_e4m3fn
    assert got["lm_head.weight"].dtype == torch.bfloat16 and got["layers.0.norm.weight"].dtype == torch.bfloat16


def test_cast_and_average_keep_the_data_of_integer_quantized_weights(tmp_path):
    """GPTQ/AWQ (int32 qweight + fp16 scales), bitsandbytes int8 (int8 weight + SCB) and 4-bit
    (uint8 weight + weight.absmax / weight.quant_map...), compressed-tensors (int32 weight_packed +
    weight_scale): the floating tensors that dequantize the codes keep their dtype and values under
    a cast, and the first checkpoint's under average (with its codes); biases, norms and the
    unquantized layers are cast and averaged as usual."""
    from safetensors.torch import load_file, save_file

    fp16 = torch.float16

    def quantized(seed):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s, dt=torch.float32: torch.randn(*s, generator=g).to(dt)  # noqa: E731
        return {
            "gptq.qweight": torch.randint(0, 2**31 - 1, (2, 8), dtype=torch.int32, generator=g),
            "gptq.qzeros": torch.randint(0, 2**31 - 1, (1, 1), dtype=torch.int32, generator=g),
            "gptq.scales": r(1, 8, dt=fp16), "gptq.g_idx": torch.zeros(16, dtype=torch.int32),
            "gptq.bias": r(8, dt=fp16),
            "int8.weight": torch.randint(-127, 127, (8, 8), dtype=torch.int8, generator=g), "int8.SCB": r(8),
            "nf4.weight": torch.randint(0, 255, (32, 1), dtype=torch.uint8, generator=g),
            "nf4.weight.absmax": r(4), "nf4.weight.quant_map": r(16),
            "nf4.weight.quant_state.bitsandbytes__nf4": torch.randint(0, 255, (40,), dtype=torch.uint8, generator=g),
            "ct.weight_packed": torch.randint(0, 2**31 - 1, (8, 1), dtype=torch.int32, generator=g),
            "ct.weight_scale": r(8, 1, dt=torch.bfloat16), "ct.weight_shape": torch.tensor([8, 8]),
            "norm.weight": r(8, dt=fp16), "lm_head.weight": r(8, 8, dt=fp16),
        }

    qdata = {"gptq.scales", "int8.SCB", "nf4.weight.absmax", "nf4.weight.quant_map", "ct.weight_scale"}
    a, b = quantized(0), quantized(1)
    b.update({k: v for k, v in a.items() if v.dtype in (torch.int32, torch.int8, torch.uint8, torch.int64)})
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    assert cs.load(tmp_path / "a.safetensors").quantization_data() == qdata

    new, rep = cs.cast(cs.load(tmp_path / "a.safetensors"), "bfloat16")
    assert rep["left"]["quantization data of a quantized weight"] == len(qdata) - 1  # ct's is bfloat16 already
    cs.save(new, tmp_path / "cast.safetensors")
    got = load_file(tmp_path / "cast.safetensors")
    for k in qdata:
        assert got[k].dtype == a[k].dtype and torch.equal(got[k], a[k]), k
    for k in ("gptq.bias", "norm.weight", "lm_head.weight"):
        assert got[k].dtype == torch.bfloat16, k

    new, rep = cs.average([cs.load(tmp_path / "a.safetensors"), cs.load(tmp_path / "b.safetensors")])
    cs.save(new, tmp_path / "avg.safetensors")
    got = load_file(tmp_path / "avg.safetensors")
    for k in qdata:
        assert torch.equal(got[k], a[k]), k  # with the first's codes, the first's data
    mean = ((a["lm_head.weight"].double() + b["lm_head.weight"].double()) / 2).to(fp16)
    assert torch.equal(got["lm_head.weight"], mean)


def test_cast_of_large_tensors_to_torch_zip_records_right_crcs(tmp_path, cli):
    """Built tensors of more than a MiB are written from where they were built and their CRC-32
    computed on the checking thread while the next is built (resolved when the zip is finished):
    every record's CRC matches (zipfile.testzip), values equal torch's cast; a damaged source
    record is still caught (its own CRC) and nothing is written."""
    import zipfile

    torch.manual_seed(0)
    sd = OrderedDict((f"l{i}.weight", torch.randn(600, 700)) for i in range(5))  # 1.6 MiB each
    sd["small"] = torch.randn(3)
    torch.save(sd, tmp_path / "a.pt")
    code, out, err = cli("cast", tmp_path / "a.pt", "--dtype", "float16", "-o", tmp_path / "h.pt")
    assert code == 0, err
    with zipfile.ZipFile(tmp_path / "h.pt") as z:
        assert z.testzip() is None
    got = torch.load(tmp_path / "h.pt", weights_only=True)
    assert all(torch.equal(got[k], v.half()) for k, v in sd.items())
    again = cs.load(tmp_path / "h.pt").torch_state_dict()  # ckpt-surgeon checks each CRC as it reads
    assert all(torch.equal(again[k], v.half()) for k, v in sd.items())

    raw = bytearray((tmp_path / "a.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "a.pt") as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("data/3")))
    raw[info.header_offset + 4096] ^= 0xFF  # inside record data/3's bytes
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    code, out, err = cli("cast", tmp_path / "bad.pt", "--dtype", "float16", "-o", tmp_path / "h2.pt")
    assert code == 2 and "CRC" in err and not (tmp_path / "h2.pt").exists(), err


def test_one_element_tensors_under_any_stride(tmp_path, cli):
    """A one-element tensor counts as contiguous whatever its stride (a BatchNorm statistic sliced
    with [::2] from a two-element buffer): cast kept the stride through .to() and failed to view it
    as bytes (an internal error, found by a structured fuzz); convert and diff too."""
    src = tmp_path / "s.pt"
    odd = torch.tensor([2.5, 7.0])[::2]
    assert odd.stride() == (2,) and odd.is_contiguous()
    torch.save({"bn.running_mean": odd, "w": torch.ones(2, 2), "e": torch.tensor([[1.5, 9.0]])[:, ::2]}, src)
    for args in (("cast", src, "--dtype", "float16", "-o", tmp_path / "c.pt"),
                 ("cast", src, "--dtype", "bfloat16", "-o", tmp_path / "c.safetensors"),
                 ("convert", src, "-o", tmp_path / "v.safetensors")):
        code, out, err = cli(*args)
        assert code == 0, (args, err)
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    assert c["bn.running_mean"].dtype == torch.float16 and c["bn.running_mean"].tolist() == [2.5]
    assert c["e"].tolist() == [[1.5]]
    assert load_file(tmp_path / "c.safetensors")["bn.running_mean"].tolist() == [2.5]
    assert load_file(tmp_path / "v.safetensors")["e"].tolist() == [[1.5]]
    code, out, err = cli("diff", src, tmp_path / "c.pt")
    assert code == 1 and "dtype change" in out, err
