"""Structured fuzzing: valid files with odd content, not damaged bytes (test_trust fuzzes those).

Random trees saved with torch.save (every dtype torch writes, transposed / sliced / expanded /
one-element views, sparse and quantized tensors, numpy values, Namespace, sets, aliases, odd keys)
go through the commands; state dicts mutated against their model (a tensor dropped, reshaped,
cast, NaN, prefixed) go through check, verify, fold-bn and bn-to-gn. Every run must end as the
CLI promises: exit 0, 1 or 2, never an internal error or a traceback. Seeded, so a failure
reproduces; ``CKPT_FUZZ_EXAMPLES`` scales the number of files (default 40: ~30 s). This found a
one-element strided view that cast could not write, a sparse tensor that average tried to
average, a NaN module that broke verify's report and a shape mismatch that reached fold-bn's
arithmetic.
"""

from __future__ import annotations

import argparse
import os
import random
import warnings
from collections import OrderedDict, defaultdict

import numpy as np
import pytest
import torch

EXAMPLES = int(os.environ.get("CKPT_FUZZ_EXAMPLES", "40"))

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int16, torch.int8,
          torch.uint8, torch.uint16, torch.bool, torch.complex64, torch.float8_e4m3fn]


class Trees:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        torch.manual_seed(seed)

    def tensor(self):
        rng = self.rng
        shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 3))]
        dt = rng.choice(DTYPES)
        t = torch.randn(shape) > 0 if dt == torch.bool else (torch.randn(shape) * 3).to(dt)
        r = rng.random()
        if r < 0.15 and t.dim() >= 2:
            t = t.transpose(0, 1)
        elif r < 0.25 and t.dim() >= 1 and t.shape[0] > 1:
            t = t[1:]
        elif r < 0.32:
            t = torch.ones(1).expand(rng.randint(1, 40), rng.randint(1, 40))
        elif r < 0.38 and t.numel() > 0:
            t = t.reshape(-1)[::2]
        elif r < 0.42:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantize_per_tensor's deprecation
                t = rng.choice([torch.randn(3, 3).to_sparse(), torch.quantize_per_tensor(torch.randn(4), 0.1, 0,
                                                                                         torch.qint8)])
        return t

    def key(self):
        rng = self.rng
        return (rng.choice(["module.", "", "model.", "_orig_mod."]) + rng.choice(["a", "b", "l0", "l1", "bn"]) + "."
                + rng.choice(["weight", "bias", "running_mean"]) + str(rng.randint(0, 3)))

    def value(self, depth=0):
        rng = self.rng
        r = rng.random()
        if depth > 3 or r < 0.3:
            return rng.choice([1, 2.5, "s", None, True, b"xy", np.float64(1.5), np.int64(3), (1, 2), frozenset({1}),
                               argparse.Namespace(a=1), np.ones(3), torch.device("cpu"), torch.float16,
                               torch.Size([2, 3]), slice(1, 2), float("nan"), 2**70, complex(1, 2), {1, 2}])
        if r < 0.5:
            return self.tensor()
        if r < 0.7:
            return {rng.choice(["x", "y", 1, 2, "state_dict", "optimizer", "ema"]): self.value(depth + 1)
                    for _ in range(rng.randint(0, 4))}
        if r < 0.8:
            d = defaultdict(list)
            d["k"].append(1)
            return d
        return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]

    def state_dict(self):
        rng = self.rng
        sd = OrderedDict((self.key(), self.tensor()) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.5:
            sd._metadata = OrderedDict([("", {"version": 1})])
        if rng.random() < 0.2:
            sd["extra"] = self.value()
        if rng.random() < 0.2 and sd:
            k = next(iter(sd))
            sd["alias." + k] = sd[k]
        return sd

    def file(self):
        r = self.rng.random()
        if r < 0.4:
            return self.state_dict()
        if r < 0.85:
            return {self.rng.choice(["state_dict", "model", "model_state_dict", "net"]): self.state_dict(),
                    "epoch": 1, "other": self.value()}
        return self.value()


TREE_COMMANDS = [["inspect"], ["inspect", "--json", "--values"], ["strip-prefix", "-o", "{o}.pt"],
                 ["strip-prefix", "--partial", "--prefix", "module.", "-o", "{o}.pt"], ["convert", "-o", "{o}.safetensors"],
                 ["convert", "-o", "{o}.pt"], ["diff", "{p}"], ["diff", "{prev}"], ["extract", "--layers", "re:.*", "-o", "{o}.pt"],
                 ["cast", "--dtype", "float16", "-o", "{o}.pt"], ["add-prefix", "--prefix", "m.", "-o", "{o}.safetensors"],
                 ["scan"], ["average", "{p}", "-o", "{o}.pt"], ["convert", "-o", "{o}_shards/", "--max-shard-size", "1KB"],
                 ["rename", "--map", "a=>b", "--allow-unmatched", "-o", "{o}.pt"], ["inspect", "--tensors"],
                 ["inspect", "--match", "re:l[01]", "--json"]]


def _promise_kept(args, code, out, err):
    assert code in (0, 1, 2), (args, code, out, err)
    assert "internal error" not in out + err and "Traceback" not in out + err, (args, out, err)


@pytest.mark.parametrize("seed", [11, 12])
def test_random_trees_through_the_commands(tmp_path, cli, seed):
    trees = Trees(seed)
    prev = None
    ran = 0
    for i in range(EXAMPLES // 2):
        p = tmp_path / f"c{i}.pt"
        try:
            torch.save(trees.file(), p, _use_new_zipfile_serialization=trees.rng.random() < 0.85)
        except Exception:  # noqa: BLE001 -- a tree torch itself cannot save is no test of ours
            continue
        for cmd in trees.rng.sample(TREE_COMMANDS, 4):
            subst = {"o": str(tmp_path / f"o{i}"), "p": str(p), "prev": str(prev or p)}
            args = [cmd[0], str(p)] + [x.format(**subst) for x in cmd[1:]]
            if trees.rng.random() < 0.3 and cmd[0] != "scan":
                args.append("--inert-pickle")
            _promise_kept(args, *cli(*args))
            ran += 1
        prev = tmp_path / "prev.pt"
        os.replace(p, prev)
    assert ran >= EXAMPLES  # most trees were saved and went through four commands each


def test_state_dicts_mutated_against_their_model(sample_dir, tmp_path, cli, models_py):
    rng = random.Random(5)
    torch.manual_seed(5)
    model = f"{models_py}:bnnet"
    base = torch.load(sample_dir / "bnnet.pt", weights_only=True)
    commands = [["check", "{p}", "--model", model], ["verify", str(sample_dir / "bnnet.pt"), "{p}", "--model", model],
                ["fold-bn", "{p}", "--model", model, "-o", "{o}.pt"],
                ["bn-to-gn", "{p}", "--model", model, "--groups", "8", "-o", "{o}.pt"],
                ["bn-to-gn", "{p}", "--model", model, "--groups", "4", "--calibrate", "2", "-o", "{o}.pt"],
                ["verify", "{p}", "{p}", "--model", model, "--dtype", "bfloat16", "--json"]]
    for i in range(max(6, EXAMPLES // 3)):
        sd = dict(base)
        for _ in range(rng.randint(1, 3)):
            k = rng.choice(list(sd))
            r = rng.random()
            if r < 0.2:
                del sd[k]
            elif r < 0.35:
                sd["extra." + k] = sd[k]
            elif r < 0.5:
                sd[k] = torch.randn(3, 3)
            elif r < 0.6:
                sd[k] = sd[k].to(rng.choice([torch.float16, torch.int64, torch.bfloat16]))
            elif r < 0.7:
                sd[k] = sd[k] * float("nan") if sd[k].is_floating_point() else sd[k]
            elif r < 0.8:
                sd = {rng.choice(["module.", "model.", "_orig_mod."]) + kk: v for kk, v in sd.items()}
            elif r < 0.9:
                sd[k] = torch.zeros(0)
            else:
                sd[k] = sd[k] + 1e-3 if sd[k].is_floating_point() else sd[k]
        p = tmp_path / f"m{i}.pt"
        torch.save(sd if rng.random() < 0.7 else {"state_dict": sd, "epoch": 3}, p)
        for cmd in rng.sample(commands, 3):
            args = [x.format(p=p, o=tmp_path / f"o{i}") for x in cmd]
            _promise_kept(args, *cli(*args))
