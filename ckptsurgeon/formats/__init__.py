"""Built-in formats, registered through the same hook as a third-party format plugin."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..types import FormatSpec
from . import dcp, deepspeed, dtensor_ranks, export, hf, hf_write, plainpickle, safetensors, torchfile


@hookimpl
def ckptsurgeon_formats():
    return [
        FormatSpec("torch-zip", (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl"), torchfile.sniff_zip,
                   torchfile.load_zip, torchfile.save_torch, priority=0,
                   description="torch.save zip format (read lazily, without torch)"),
        FormatSpec("torch-legacy", (), torchfile.sniff_legacy, torchfile.load_legacy, None, priority=0,
                   description="torch.save legacy pickle format (read with torch.load, weights-only)"),
        FormatSpec("pickle", (), plainpickle.sniff, plainpickle.load, None, priority=-1,
                   description="a plain pickle of weights, not torch.save (Detectron2 .pkl: numpy arrays read as tensors); "
                               "read-only"),
        FormatSpec("safetensors", (".safetensors",), safetensors.sniff, safetensors.load, safetensors.save,
                   priority=1, description="safetensors (read lazily; written zero-copy)"),
        FormatSpec("torch-export", (".pt2",), export.sniff, export.load, None, priority=1,
                   description="torch.export program archive (.pt2): its weights, read lazily without torch or the "
                               "program; read-only"),
        FormatSpec("nemo", (), torchfile.sniff_nemo, torchfile.load_nemo, None, priority=1,
                   description="NeMo 1.x .nemo archive (the torch zip inside read in place; read-only)"),
        FormatSpec("dcp", (), dcp.sniff, dcp.load, None, priority=1,
                   description="torch.distributed.checkpoint folder (.metadata + .distcp; read-only, no process group)"),
        FormatSpec("dtensor-ranks", (), dtensor_ranks.sniff, dtensor_ranks.load, None, priority=1,
                   description="folder of per-rank torch.save files of DTensors (FSDP2/TP), put together; read-only"),
        FormatSpec("deepspeed", (), deepspeed.sniff, deepspeed.load, None, priority=2,
                   description="DeepSpeed checkpoint folder (model states; ZeRO-3 partitions put together); read-only"),
        FormatSpec("hf-folder", (), hf.sniff, hf.load, hf_write.save_sharded, priority=0,
                   description="Hugging Face folder: single file or sharded with *.index.json"),
    ]
