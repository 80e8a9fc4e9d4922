"""A tiny third-party plugin: a 'count' command, an 'npz' format and an operation."""

import os
from collections import OrderedDict

import click

from ckptsurgeon import hookimpl
from ckptsurgeon.checkpoint import Checkpoint, Source
from ckptsurgeon.types import FormatSpec, Operation


def _sniff(path, head):
    return path.endswith(".npz") and head[:4] == b"PK\x03\x04"


def _load(path, **_):
    import numpy as np
    import torch

    with np.load(path) as data:
        state = OrderedDict((k, torch.from_numpy(data[k].copy())) for k in data.files)
    return Checkpoint(state=state, source=Source(path, "npz", os.path.getsize(path), (path,), lazy=False))


def _save(ck, path, dry_run=False, **_):
    import numpy as np

    from ckptsurgeon.atomic import atomic_path

    arrays = {k: v.to_torch().numpy() if hasattr(v, "to_torch") else v.numpy() for k, v in ck.tensor_items()}
    if not dry_run:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    return {"output": path, "format": "npz", "tensors": len(arrays), "bytes": 0, "notes": []}


@click.command("count")
@click.argument("path")
def count(path):
    """Count tensors."""
    import ckptsurgeon

    click.echo(f"{len(ckptsurgeon.load(path).state)} tensors")


def tensor_count(ck):
    return len(ck.state)


@hookimpl
def ckptsurgeon_commands():
    return [count]


@hookimpl
def ckptsurgeon_formats():
    return [FormatSpec("npz", (".npz",), _sniff, _load, _save, priority=5, description="numpy npz")]


@hookimpl
def ckptsurgeon_operations():
    return [Operation("tensor_count", tensor_count)]
