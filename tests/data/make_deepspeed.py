"""Writes the DeepSpeed checkpoints in tests/data/deepspeed/ (run by hand; DeepSpeed is not a
test dependency). Needs deepspeed (0.19.8 was used: DS_BUILD_OPS=0 pip install deepspeed) and
runs on CPU with gloo:

    python tests/data/make_deepspeed.py tests/data/deepspeed

Three ranks train a small tied-embedding model with buffers (float and int), a frozen layer and two
parameter groups for two steps under ZeRO-3 (fp32 and bf16) and ZeRO-2 (bf16), save with
engine.save_checkpoint, and write DeepSpeed's own consolidation (zero_to_fp32's
get_fp32_state_dict_from_zero_checkpoint) beside each folder as <name>.zero_to_fp32.pt; the
scripts DeepSpeed copies into each folder are removed (third-party code, not needed).
"""

import os
import sys

import torch
import torch.multiprocessing as mp

WORLD = 3


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))
        self.register_buffer("steps", torch.tensor(3))
        self.frozen = torch.nn.Linear(6, 6)
        self.mid = torch.nn.Linear(6, 5)
        self.up = torch.nn.Linear(5, 6, bias=False)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.norm(self.embed(x) * self.scale.to(self.embed.weight.dtype))
        return self.head(self.up(torch.relu(self.mid(self.frozen(h)))))


def _rank(rank, stage, dtype, out, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    torch.manual_seed(0)
    net = Net()
    decay = [p for n, p in net.named_parameters() if p.requires_grad and n.endswith("weight") and "norm" not in n]
    other = [p for n, p in net.named_parameters() if p.requires_grad and not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=0.05)
    cfg = {"train_batch_size": 4 * WORLD, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x = torch.randint(0, 11, (4,), generator=g)
        loss = engine(x).float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag="global_step2")


def main(root):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for i, (name, stage, dtype) in enumerate((("zero3", 3, "fp32"), ("zero3_bf16", 3, "bf16"), ("zero2_bf16", 2, "bf16"))):
        out = os.path.join(root, name)
        mp.spawn(_rank, args=(stage, dtype, out, 29600 + i), nprocs=WORLD)
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            if os.path.exists(os.path.join(out, script)):
                os.remove(os.path.join(out, script))
        sd = get_fp32_state_dict_from_zero_checkpoint(out)
        torch.save({k: v.contiguous().clone() for k, v in sd.items()}, os.path.join(root, f"{name}.zero_to_fp32.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
