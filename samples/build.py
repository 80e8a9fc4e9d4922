"""Build the sample checkpoints deterministically (seconds, no downloads) into samples/out/.

    python samples/build.py [OUTDIR]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import bnnet, randomize_norm_stats, seednet  # noqa: E402


def train_a_little(model, steps=3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16)
        y = torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(model(x)[:, :10], y % model(x).shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return opt, sched


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = seednet()
    opt, sched = train_a_little(model)
    randomize_norm_stats(model, seed=1)
    sd = model.state_dict()
    p = lambda name: os.path.join(out, name)  # noqa: E731

    torch.save(sd, p("seednet.pt"))
    torch.save(nn.DataParallel(model).state_dict(), p("seednet_dp.pt"))
    torch.save({"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "epoch": 3,
                "scheduler_state_dict": sched.state_dict(), "loss": 1.25}, p("seednet_resume.pt"))
    torch.save(torch.compile(model).state_dict(), p("seednet_compiled.pt"))  # '_orig_mod.' keys
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, p("seednet.safetensors"), metadata={"format": "pt"})
    lightning = {
        "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
        "state_dict": {"model." + k: v for k, v in sd.items()},
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
        "hyper_parameters": {"lr": 1e-3, "num_classes": 10}, "callbacks": {},
    }
    torch.save(lightning, p("seednet_lightning.ckpt"))
    torch.save(sd, p("seednet_legacy.pt"), _use_new_zipfile_serialization=False)
    # Hugging Face-style sharded folder (two shards + index)
    hf = p("seednet_hf")
    os.makedirs(hf, exist_ok=True)
    names = list(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, os.path.join(hf, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    # a finetuned copy: the head and the last BN changed, epoch moved on
    ft = {k: v.clone() for k, v in sd.items()}
    g = torch.Generator().manual_seed(5)
    ft["fc.weight"] += 0.01 * torch.randn(ft["fc.weight"].shape, generator=g)
    ft["bn4.running_mean"] += 0.1
    torch.save({"model_state_dict": ft, "optimizer_state_dict": opt.state_dict(), "epoch": 6,
                "scheduler_state_dict": sched.state_dict(), "loss": 0.9}, p("seednet_finetuned.pt"))
    # a LoRA adapter laid out as PEFT's save_pretrained writes one (r=4 on fc and conv4), for merge-lora
    lora = p("seednet_lora")
    os.makedirs(lora, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    pre = "base_model.model."
    save_file({pre + "fc.lora_A.weight": 0.04 * torch.randn(4, 48, generator=g),
               pre + "fc.lora_B.weight": 0.04 * torch.randn(10, 4, generator=g),
               pre + "conv4.lora_A.weight": 0.04 * torch.randn(4, 32, 3, 3, generator=g),
               pre + "conv4.lora_B.weight": 0.04 * torch.randn(48, 4, 1, 1, generator=g)},
              os.path.join(lora, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(lora, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc", "conv4"],
                   "fan_in_fan_out": False, "use_rslora": False, "bias": "none"}, f, indent=2)
    # BN-heavy model for fold-bn / bn-to-gn
    torch.manual_seed(1)
    bn = randomize_norm_stats(bnnet(), seed=2).eval()
    torch.save(bn.state_dict(), p("bnnet.pt"))
    print(f"samples written to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
