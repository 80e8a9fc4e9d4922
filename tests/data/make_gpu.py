"""Writes the GPU-saved checkpoints in tests/data/gpu/ (run by hand on a machine with CUDA; the
files were made on an H100 with torch 2.11, transformers 5.17, Lightning 2.6.6 and timm):

    python tests/data/make_gpu.py tests/data/gpu            # --device cpu: a dry run of the same code

Every file is written by the library that writes such files in the field, from tensors on the
GPU, after a real (tiny) training step: storages say ``cuda:0``, the optimizer state lives on the
GPU, AMP scaler state is saved beside it. Beside each one that torch cannot read back on its
own, the expected CPU tensors are saved as ``<name>.expected.pt`` (plain torch.save).

  cuda_state_dict.pt     model.cuda().state_dict() after an AMP step
  cuda_tensors.pt        bf16/fp16/int cuda tensors, a transposed view and a slice sharing storage
  cuda_legacy.pt         the state dict with _use_new_zipfile_serialization=False (torch.cuda.*Storage)
  ddp_resume.pt          DistributedDataParallel (NCCL) resume dict: model_state_dict (module.),
                         optimizer_state_dict (AdamW, state on the GPU), scaler, epoch, rng
  compile_ddp.pt         torch.compile(DDP(model)).state_dict()  (_orig_mod.module.)
  ddp_compile.pt         DDP(torch.compile(model)).state_dict()  (module._orig_mod.)
  whole_model_cuda.pt    torch.save(model) of the whole module (class __main__.Net)
  fsdp2_dcp/             FSDP2 (fully_shard) model + optimizer saved with torch.distributed.checkpoint
  fsdp2_rank0.pt         the FSDP2 model's state_dict() (DTensors) saved with torch.save
  lightning_16mixed.ckpt Lightning Trainer(accelerator='gpu', precision='16-mixed') last.ckpt
  timm/last.pth.tar      timm's CheckpointSaver (args Namespace, EMA, NativeScaler) on a timm model
  hf_llama/              transformers LlamaForCausalLM (bf16, on the GPU) save_pretrained, sharded safetensors
  hf_gpt2/               transformers GPT2 (tied head) save_pretrained(safe_serialization=False): .bin
                         where that version still writes one, else model.safetensors
  hf_trainer/checkpoint-2/  transformers Trainer (bf16) checkpoint folder: model, optimizer.pt,
                         scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin
  accelerate_state/      accelerate Accelerator(mixed_precision='fp16').save_state folder
  peft_lora/             a PEFT LoRA adapter on a tiny Llama
  lightning_fsdp.ckpt/   Lightning FSDPStrategy(state_dict_type='sharded') checkpoint folder
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def train_step(model, opt, device, scaler=None, steps=2):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g).to(device)
        y = torch.randint(0, 10, (4,), generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=scaler is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    return loss.detach()


@contextlib.contextmanager
def process_group(device, tmp):
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/pg",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def plain(out, device):
    torch.manual_seed(0)
    net = Net().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if device.type == "cuda" else None
    train_step(net, opt, device, scaler)
    torch.save(net.state_dict(), out / "cuda_state_dict.pt")
    torch.save(net.state_dict(), out / "cuda_legacy.pt", _use_new_zipfile_serialization=False)
    w = net.head.weight.detach()
    g = torch.Generator().manual_seed(2)
    tensors = {"bf16": torch.randn(3, 4, generator=g).to(device, torch.bfloat16),
               "fp16": torch.randn(5, generator=g).to(device, torch.float16),
               "int64": torch.arange(6, device=device).view(2, 3),
               "bool": torch.tensor([True, False], device=device),
               "scalar": torch.tensor(3.5, device=device),
               "weight": w, "weight_t": w.t(), "rows_2_5": w[2:5], "every_other": w[:, ::2]}
    torch.save(tensors, out / "cuda_tensors.pt")
    torch.save(net, out / "whole_model_cuda.pt")
    torch.save(cpu_copy(net.state_dict()), out / "whole_model_cuda.expected.pt")


def ddp(out, device, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    with process_group(device, tmp):
        torch.manual_seed(0)
        net = Net().to(device)
        model = DDP(net, device_ids=[device.index or 0] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type) if device.type == "cuda" else None
        loss = train_step(model, opt, device, scaler)
        state = {"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "loss": loss,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}
        torch.save(state, out / "ddp_resume.pt")
        torch.save(torch.compile(model).state_dict(), out / "compile_ddp.pt")
        net2 = Net().to(device)
        net2.load_state_dict(net.state_dict())
        model2 = DDP(torch.compile(net2), device_ids=[device.index or 0] if device.type == "cuda" else None)
        torch.save(model2.state_dict(), out / "ddp_compile.pt")


def fsdp2(out, device, tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with process_group(device, tmp):
        torch.manual_seed(0)
        net = Net().to(device)
        mesh = init_device_mesh(device.type, (1,))
        fully_shard(net.features, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        train_step(net, opt, device)
        msd = get_model_state_dict(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": msd, "optim": get_optimizer_state_dict(net, opt), "step": 2},
                     checkpoint_id=str(out / "fsdp2_dcp"))
        torch.save(net.state_dict(), out / "fsdp2_rank0.pt")
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in msd.items()}
        torch.save(full, out / "fsdp2.expected.pt")


def lightning(out, device, tmp):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from make_lightning import Net as LNet
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    dl = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8)
    net = LNet()
    run = Path(tmp) / "lightning"
    trainer = L.Trainer(max_epochs=2, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="16-mixed" if device.type == "cuda" else "bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=run, monitor="val_loss", save_last=True)])
    trainer.fit(net, dl, dl)
    shutil.copy(run / "last.ckpt", out / "lightning_16mixed.ckpt")
    torch.save(cpu_copy(net.state_dict()), out / "lightning_16mixed.expected.pt")


def timm_saver(out, device, tmp):
    import timm
    from timm.utils import CheckpointSaver, NativeScaler

    try:
        from timm.utils import ModelEmaV3 as ModelEma
    except ImportError:
        from timm.utils import ModelEmaV2 as ModelEma

    names = [n for n in ("test_resnet", "test_efficientnet", "test_vit") if n in timm.list_models("test_*")]
    name = names[0] if names else "resnet10t"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).to(device)
    if sum(p.numel() for p in model.parameters()) > 2_000_000:
        raise RuntimeError(f"{name} is too big for a fixture")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ModelEma(model, decay=0.9)
    loss_scaler = NativeScaler() if device.type == "cuda" else None
    cfg = model.pretrained_cfg
    size = cfg.get("input_size", (3, 160, 160))
    x = torch.randn(2, *size, device=device)
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        loss = model(x).float().logsumexp(1).mean()
    if loss_scaler is not None:
        loss_scaler(loss, opt, parameters=model.parameters())
    else:
        loss.backward()
        opt.step()
    ema.update(model)
    args = argparse.Namespace(model=name, lr=0.1, epochs=2, batch_size=2, amp=True, output=str(tmp))
    folder = out / "timm"
    folder.mkdir(exist_ok=True)
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, amp_scaler=loss_scaler, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(0, metric=0.5)
    for f in folder.iterdir():
        if f.name != "last.pth.tar":
            f.unlink()
    (folder / "model_name.txt").write_text(name + "\n")  # no expected file: torch reads it with Namespace allowed


def hf(out, device, tmp):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(device, torch.bfloat16)
    model.save_pretrained(out / "hf_llama", max_shard_size="40KB")
    torch.save(cpu_copy(model.state_dict()), out / "hf_llama.expected.pt")
    cfg2 = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)
    gpt = transformers.GPT2LMHeadModel(cfg2).to(device)
    try:  # transformers 5 writes safetensors whatever this says
        gpt.save_pretrained(out / "hf_gpt2", safe_serialization=False)
    except TypeError:
        gpt.save_pretrained(out / "hf_gpt2")
    torch.save(cpu_copy(gpt.state_dict()), out / "hf_gpt2.expected.pt")


def _tiny_llama(transformers, device):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(device)


def hf_trainer(out, device, tmp):
    """transformers Trainer, two steps, checkpoint-2/ as the Trainer writes it (model.safetensors,
    optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin)."""
    import transformers

    model = _tiny_llama(transformers, device)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (8, 16), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(Path(tmp) / "run"), max_steps=2, save_steps=2,
                                          per_device_train_batch_size=4, report_to=[], logging_steps=1,
                                          bf16=device.type == "cuda", use_cpu=device.type != "cuda")
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    shutil.copytree(Path(tmp) / "run" / "checkpoint-2", out / "hf_trainer" / "checkpoint-2")
    torch.save(cpu_copy(model.state_dict()), out / "hf_trainer.expected.pt")


def accelerate_state(out, device, tmp):
    """accelerate's Accelerator.save_state folder after an fp16 AMP step (model.safetensors,
    optimizer.bin, scheduler.bin, scaler.pt, random_states_0.pkl)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the Trainer step before set up its own (bf16)
    acc = Accelerator(mixed_precision="fp16" if device.type == "cuda" else "no", cpu=device.type != "cuda")
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    net, opt, sched = acc.prepare(net, opt, sched)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g).to(acc.device)
    y = torch.randint(0, 10, (4,), generator=g).to(acc.device)
    loss = nn.functional.cross_entropy(net(x), y)
    acc.backward(loss)
    opt.step()
    sched.step()
    acc.save_state(str(out / "accelerate_state"))
    torch.save(cpu_copy(acc.unwrap_model(net).state_dict()), out / "accelerate_state.expected.pt")


def peft_lora(out, device, tmp):
    """A PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) on a tiny Llama."""
    import peft
    import transformers

    model = _tiny_llama(transformers, device)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    lora.save_pretrained(str(out / "peft_lora"))
    torch.save(cpu_copy(peft.get_peft_model_state_dict(lora)), out / "peft_lora.expected.pt")


def lightning_fsdp(out, device, tmp):
    """Lightning's FSDPStrategy with sharded state dicts: the checkpoint is a folder (meta.pt and a
    torch.distributed.checkpoint save of model and optimizer)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy
    from make_lightning import Net as LNet
    from torch.utils.data import DataLoader, TensorDataset

    if device.type != "cuda":
        raise RuntimeError("Lightning's FSDPStrategy needs CUDA")
    torch.manual_seed(0)
    dl = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8)
    net = LNet()
    run = Path(tmp) / "fsdp"
    trainer = L.Trainer(max_epochs=1, accelerator="gpu", devices=1, strategy=FSDPStrategy(state_dict_type="sharded"),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=run, save_last=True)])
    trainer.fit(net, dl, dl)
    shutil.copytree(run / "last.ckpt", out / "lightning_fsdp.ckpt")
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in net.state_dict().items()}
    torch.save(cpu_copy(full), out / "lightning_fsdp.expected.pt")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("make_gpu: CUDA is not available here (pass --device cpu for a dry run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for step in (plain, ddp, fsdp2, lightning, timm_saver, hf, hf_trainer, accelerate_state, peft_lora, lightning_fsdp):
        if args.only and step.__name__ not in args.only.split(","):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if step is plain:
                    step(out, device)
                else:
                    step(out, device, tmp)
                print(f"make_gpu: {step.__name__}: ok")
            except Exception:  # noqa: BLE001 - one missing library must not lose the other fixtures
                traceback.print_exc()
                failed.append(step.__name__)
                print(f"make_gpu: {step.__name__}: FAILED")
    info = f"torch {torch.__version__}"
    if device.type == "cuda":
        info += f", {torch.cuda.get_device_name(device)}"
    for mod in ("transformers", "lightning", "timm", "accelerate", "peft"):
        with contextlib.suppress(Exception):
            info += f", {mod} {__import__(mod).__version__}"
    (out / "MADE_WITH.txt").write_text(info + "\n")
    print("make_gpu:", info, "failed:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
