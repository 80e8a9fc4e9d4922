"""GPU check: verify surgery results on CUDA for the samples and a few real architectures.

On a machine with a GPU (its Python already has torch, and ideally timm, torchvision and
transformers; deepdiff/xxhash/rich are not needed here), from the repository root:

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 benchmarks/gpu_check.py

For each model (random init, randomised norm statistics, no downloads) it writes the weights as a
DataParallel/DDP-style file, then checks with ``ckptsurgeon.verify`` on CUDA:
  strip-prefix           the stripped file computes what the original does
  extract+reroot         a backbone extracted from a wrapper model, loaded into the bare model
  fold-bn                BN folded into conv/linear (where torch.fx can trace the model)
  cpu-vs-gpu             the same weights on CPU and on CUDA (TF32 off)
and times ``verify`` against a hand-written plain-torch check of the same pair. One table is
printed at the end. Asked for CUDA where there is none, it exits 2 with a clear message; it
never silently falls back to the CPU (``--device cpu`` runs the same checks on the CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "samples"))

import ckptsurgeon as cs  # noqa: E402
from models import bnnet, randomize_norm_stats, seednet  # noqa: E402


def candidates():
    """(name, factory, input shape, fold?) for what this machine has installed."""
    out = [("samples.seednet", seednet, (4, 3, 32, 32), False), ("samples.bnnet", bnnet, (4, 3, 32, 32), True)]
    missing = []
    try:
        import torchvision

        out.append(("torchvision.resnet18", lambda: torchvision.models.resnet18(weights=None), (4, 3, 224, 224), True))
        out.append(("torchvision.mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(weights=None),
                    (4, 3, 224, 224), True))
    except Exception as e:  # noqa: BLE001
        missing.append(f"torchvision ({type(e).__name__})")
    try:
        import timm

        out.append(("timm.resnet50", lambda: timm.create_model("resnet50", pretrained=False), (2, 3, 224, 224), True))
        out.append(("timm.vit_tiny_patch16_224", lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
                    (2, 3, 224, 224), False))
    except Exception as e:  # noqa: BLE001
        missing.append(f"timm ({type(e).__name__})")
    try:
        import transformers

        def bert():
            cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=256)
            return transformers.BertModel(cfg)

        out.append(("transformers.BertModel(tiny)", bert, None, False))
    except Exception as e:  # noqa: BLE001
        missing.append(f"transformers ({type(e).__name__})")
    return out, missing


def make_inputs(model, shape, device):
    g = torch.Generator().manual_seed(0)
    if shape is None:
        return {"input_ids": torch.randint(0, model.config.vocab_size, (2, 16), generator=g).to(device)}
    return torch.randn(shape, generator=g).to(device)


def plain_check(factory, path_a, path_b, shape, device) -> float:
    """What people write by hand: two models, load_state_dict, forward, allclose. Seconds."""
    t0 = time.perf_counter()
    ma, mb = factory().eval().to(device), factory().eval().to(device)
    sa = torch.load(path_a, map_location=device, weights_only=True)
    sb = torch.load(path_b, map_location=device, weights_only=True)
    ma.load_state_dict(OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sa.items()))
    mb.load_state_dict(sb)
    x = make_inputs(ma, shape, device)
    with torch.no_grad():
        oa = ma(**x) if isinstance(x, dict) else ma(x)
        ob = mb(**x) if isinstance(x, dict) else mb(x)
    oa = oa[0] if not isinstance(oa, torch.Tensor) else oa
    ob = ob[0] if not isinstance(ob, torch.Tensor) else ob
    torch.allclose(oa, ob)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _tf32_state():
    import importlib

    v = importlib.import_module("ckptsurgeon.plugins.verify_numerics")
    get, _ = v.precision_api()
    return ([get(b, o) for b, o in v.PRECISION_SLOTS] if get else None), v.legacy_flags()


def tf32_rows(models, tmp: Path, device):
    """verify with TF32 switched on by the caller, through the legacy flags and through the
    per-backend API of torch >= 2.9 (mixing them makes torch raise): the check must still pass
    (TF32 off inside it), and the caller's settings must come back as they were."""
    name, factory, shape, _fold = next((m for m in models if m[0] == "timm.resnet50"), models[-1])
    torch.manual_seed(0)
    net = randomize_norm_stats(factory()).eval()
    torch.save(net.state_dict(), tmp / "tf32.pt")
    a = torch.randn(2048, 2048, device=device)
    exact = (a.double() @ a.double())
    out = []
    setups = {"legacy allow_tf32=True": lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", True),
                                                setattr(torch.backends.cudnn, "allow_tf32", True))}
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        setups["fp32_precision='tf32'"] = lambda: (setattr(torch.backends, "fp32_precision", "tf32"),
                                                  setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
                                                  setattr(torch.backends.cudnn.conv, "fp32_precision", "tf32"))
    for label, setup in setups.items():
        setup()
        before = _tf32_state()
        err_on = ((a @ a).double() - exact).abs().max().item()
        from ckptsurgeon.plugins.verify_numerics import no_tf32

        with no_tf32():
            err_off = ((a @ a).double() - exact).abs().max().item()
        t0 = time.perf_counter()
        rep = cs.verify(tmp / "tf32.pt", tmp / "tf32.pt", model=factory, input_shape=shape, device=str(device))
        r = row(name, f"TF32 on by {label}", rep, time.perf_counter() - t0)
        restored = _tf32_state() == before
        r["check"] += f"; matmul err {err_on:.2g} on / {err_off:.2g} in check; restored: {restored}"
        r["equivalent"] = r["equivalent"] and restored
        out.append(r)
        from ckptsurgeon.plugins.verify_numerics import PRECISION_SLOTS, precision_api

        _, put = precision_api()  # back to torch's defaults for the next setup
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        if put:
            for (b, o) in PRECISION_SLOTS:
                put(b, o, "tf32" if b == "cuda" and o in ("conv", "rnn") else "none")
    return out


def row(model, check, rep, seconds, plain=None):
    out = rep["outputs"][0]
    return {"model": model, "check": check, "device": rep["device"], "equivalent": rep["equivalent"],
            "max_abs": out["max_abs"], "tolerance": out["tolerance"], "verify_s": seconds, "plain_s": plain,
            "first_divergent": rep["first_divergent"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--only", default=None, help="comma-separated substrings of model names to run")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA was asked for but is not available on this machine "
              "(run on a GPU machine, or pass --device cpu to run the same checks on the CPU)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    models, missing = candidates()
    if args.only:
        keys = args.only.split(",")
        models = [m for m in models if any(k in m[0] for k in keys)]
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, factory, shape, fold in models:
            try:
                torch.manual_seed(0)
                net = randomize_norm_stats(factory()).eval()
                sd = net.state_dict()
                full = tmp / "full.pt"
                torch.save(OrderedDict(("module." + k, v) for k, v in sd.items()), full)
                input_shape = shape
                # strip-prefix
                new, _ = cs.strip_prefix(cs.load(full))
                cs.save(new, tmp / "stripped.pt")
                t0 = time.perf_counter()
                rep = cs.verify(full, tmp / "stripped.pt", model=factory, input_shape=input_shape, device=str(device))
                rows.append(row(name, "strip-prefix", rep, time.perf_counter() - t0,
                                plain_check(factory, full, tmp / "stripped.pt", shape, device)))
                # extract + reroot from a wrapper model
                wrapped = OrderedDict(("module.backbone." + k, v) for k, v in sd.items())
                wrapped["module.head.weight"] = torch.randn(3, 3)
                torch.save(wrapped, tmp / "wrapped.pt")
                ext, _ = cs.extract(cs.load(tmp / "wrapped.pt"), ["backbone"], reroot="backbone.")
                cs.save(ext, tmp / "backbone.safetensors")
                t0 = time.perf_counter()
                rep = cs.verify(tmp / "stripped.pt", tmp / "backbone.safetensors", model=factory,
                                input_shape=input_shape, device=str(device))
                rows.append(row(name, "extract+reroot", rep, time.perf_counter() - t0))
                if fold:
                    folded, frep = cs.fold_bn(cs.load(tmp / "stripped.pt"), factory())
                    cs.save(folded, tmp / "folded.pt")
                    t0 = time.perf_counter()
                    rep = cs.verify(tmp / "stripped.pt", tmp / "folded.pt", model=factory, input_shape=input_shape,
                                    device=str(device))
                    rows.append(row(name, f"fold-bn ({len(frep['folded'])} BN)", rep, time.perf_counter() - t0))
                t0 = time.perf_counter()
                rep = cs.verify(full, tmp / "backbone.safetensors", model=factory, input_shape=input_shape,
                                device=str(device), dtype="bfloat16")
                rows.append(row(name, "strip+extract, bfloat16", rep, time.perf_counter() - t0))
                if device.type == "cuda":
                    t0 = time.perf_counter()
                    rep = cs.verify(tmp / "stripped.pt", tmp / "stripped.pt", model=factory, input_shape=input_shape,
                                    cross_device=True)
                    rows.append(row(name, "cpu-vs-gpu", rep, time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001 - report and go on with the next model
                failures.append(f"{name}: {type(e).__name__}: {e}")
                traceback.print_exc()
        if device.type == "cuda" and models:
            try:
                rows.extend(tf32_rows(models, tmp, device))
            except Exception as e:  # noqa: BLE001
                failures.append(f"tf32: {type(e).__name__}: {e}")
                traceback.print_exc()
    print(f"\nGPU check on {gpu} (torch {torch.__version__})")
    print("| model | check | device | equivalent | max abs err | tolerance | verify s | plain torch s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        plain = f"{r['plain_s']:.2f}" if r["plain_s"] is not None else ""
        err = f"{r['max_abs']:.3g}" if r["max_abs"] is not None else "n/a"
        tol = f"{r['tolerance']:.3g}" if r["tolerance"] is not None else "n/a"
        print(f"| {r['model']} | {r['check']} | {r['device']} | {'yes' if r['equivalent'] else 'NO'} | {err} | {tol} "
              f"| {r['verify_s']:.2f} | {plain} |")
    for m in missing:
        print(f"not installed here, skipped: {m}")
    for f in failures:
        print(f"FAILED: {f}")
    bad = [r for r in rows if not r["equivalent"]]
    return 1 if failures or bad else 0


if __name__ == "__main__":
    sys.exit(main())
