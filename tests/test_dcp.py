"""torch.distributed.checkpoint folders: read safely (nothing in .metadata runs), lazily where a
tensor is one chunk, assembled where it was sharded over ranks; same result as torch's own
dcp_to_torch_save. Files are written by real torch.distributed.checkpoint saves (one process, and
two gloo ranks with sharded DTensors)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
import zipfile

import pytest
import torch

import ckptsurgeon as cs
from ckptsurgeon.errors import CorruptCheckpointError, UnsafePickleError
from ckptsurgeon.byteranges import AssembledBytes, file_pieces

dcp = pytest.importorskip("torch.distributed.checkpoint")


def _save(state, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(folder))


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    folder = tmp_path / "step7"
    _save({"model": net.state_dict(), "optim": opt.state_dict(), "step": 7, "name": "run1"}, folder)
    return net, folder


def test_dcp_folder_reads_lazily_like_torchs_own_converter(trained, tmp_path, cli, same):
    net, folder = trained
    ck = cs.load(folder)
    assert ck.source.format == "dcp" and ck.source.lazy and ck.sd_path == ("model",)
    assert list(ck.state) == list(net.state_dict())
    assert cs.load(folder / ".metadata").sd_path == ("model",)  # the metadata file names the folder too
    code, out, err = cli("inspect", folder)
    assert code == 0 and "dcp" in out and "state dict at: model" in out, err

    code, _, err = cli("convert", folder, "-o", tmp_path / "ours.pt")
    assert code == 0, err
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(folder), str(tmp_path / "theirs.pt"))
    same(torch.load(tmp_path / "theirs.pt", weights_only=False), torch.load(tmp_path / "ours.pt", weights_only=True))

    code, _, err = cli("extract", folder, "-o", tmp_path / "first.safetensors", "--layers", "0")
    assert code == 0, err
    from safetensors.torch import load_file

    got = load_file(tmp_path / "first.safetensors")
    assert list(got) == ["0.weight", "0.bias"] and torch.equal(got["0.weight"], net[0].weight.detach())
    code, _, err = cli("convert", folder, "-o", tmp_path / "again", "--format", "dcp")
    assert code == 2 and "Traceback" not in err


def _spawn(fn, world: int, out: str, tmp_path) -> None:
    """``fn(rank, world, out, initfile)`` on ``world`` gloo ranks. Gloo's teardown can abort a
    rank after its work is done ("terminate called without an active exception": torch's own
    issue, seen once in many CI runs); such a crash is retried once, on a fresh rendezvous file.
    A failure raised by ``fn`` itself is not retried."""
    import torch.multiprocessing as mp

    for attempt in range(2):
        init = tmp_path / f"init_{fn.__name__}_{world}_{attempt}"
        try:
            mp.spawn(fn, args=(world, out, str(init)), nprocs=world)
            return
        except mp.ProcessExitedException:
            if attempt:
                raise


def _sharded_rank(rank, world, out, initfile):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{initfile}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        w, e = torch.randn(7, 5, generator=g), torch.randn(6, 3, generator=g).to(torch.bfloat16)
        state = {"model": {"layers.0.weight": distribute_tensor(w, mesh, [Shard(0)]),  # 4 + 3 rows
                           "embed.weight": distribute_tensor(e, mesh, [Shard(1)]),     # 2 + 1 columns
                           "norm.weight": distribute_tensor(torch.ones(5), mesh, [Replicate()])},
                 "step": 3}
        from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=out)
            dcp.save(state, storage_writer=FileSystemWriter(out + "_st", serialization_format=SerializationFormat.SAFETENSORS))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_dcp_safetensors_data_files(tmp_path):
    """SerializationFormat.SAFETENSORS: non-tensor values' archives first, then one safetensors
    blob whose start the metadata gives as every tensor's offset (reading raw bytes there would
    return the header as data)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"a": a, "b": b}, "step": 5, "cfg": {"lr": 0.1}},
                 storage_writer=FileSystemWriter(str(tmp_path / "st"), serialization_format=SerializationFormat.SAFETENSORS))
    ck = cs.load(tmp_path / "st")
    assert ck.source.lazy and ck.wrapper["step"] == 5 and ck.wrapper["cfg"] == {"lr": 0.1}
    sd = ck.torch_state_dict()
    assert torch.equal(sd["a"], a) and torch.equal(sd["b"], b) and sd["b"].dtype == torch.int32


def test_dcp_tensors_sharded_over_ranks_are_assembled(tmp_path, cli, flip_byte, monkeypatch):
    """Two gloo ranks save row- and column-sharded DTensors (uneven shards, bf16) and a
    replicated one: the reader puts each tensor together from its chunks."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not built")
    out = tmp_path / "sharded"
    _spawn(_sharded_rank, 2, str(out), tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    g = torch.Generator().manual_seed(0)
    w, e = torch.randn(7, 5, generator=g), torch.randn(6, 3, generator=g).to(torch.bfloat16)

    from ckptsurgeon.formats import dcp as dcp_format

    with monkeypatch.context() as m:  # read for shapes: no chunk's archive is even opened
        m.setattr(dcp_format, "_embedded", lambda *a: pytest.fail("a chunk archive was parsed"))
        ck = cs.load(out)
        assert ck.state["layers.0.weight"].shape == (7, 5) and ck.state["norm.weight"].shape == (5,)
    for folder in (out, tmp_path / "sharded_st"):  # torch.save archives; safetensors data files
        ck = cs.load(folder)
        assert ck.source.lazy and any("put together when read" in n for n in ck.notes)
        # nothing assembled by loading: shapes and dtypes from the metadata (inspect reads no data)
        sharded = ck.state["layers.0.weight"]
        assert isinstance(sharded.storage.source, AssembledBytes) and sharded.storage._torch is None
        # rows split over ranks: the pieces' bytes one after another are the tensor's (copied from
        # the files); columns split: put together with torch
        assert [p.shape for p in sharded.storage.source.parts] == [(4, 5), (3, 5)]
        assert ck.state["embed.weight"].storage.source.parts is None
        assert sharded.shape == (7, 5) and ck.state["embed.weight"].dtype == "bfloat16"
        sd = ck.torch_state_dict()
        assert torch.equal(sd["layers.0.weight"], w) and torch.equal(sd["embed.weight"], e)
        assert sd["embed.weight"].dtype == torch.bfloat16 and torch.equal(sd["norm.weight"], torch.ones(5))
        assert ck.wrapper["step"] == 3
    code, _, err = cli("convert", out, "-o", tmp_path / "full.pt")
    assert code == 0, err
    assert torch.equal(torch.load(tmp_path / "full.pt", weights_only=True)["model"]["layers.0.weight"], w)
    ck = cs.load(out)  # a save assembles each tensor for its write and keeps none of them
    cs.save(ck, tmp_path / "full.safetensors")
    assert ck.state["layers.0.weight"].storage._torch is None
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "full.safetensors")["embed.weight"], e)

    assert cli("diff", out, tmp_path / "full.pt", "--json")[0] == 0  # hashed piece by piece: identical
    flipped = tmp_path / "flipped"  # one byte of a row piece damaged: its CRC, checked while copying
    shutil.copytree(out, flipped)
    sharded = cs.load(flipped).state["layers.0.weight"]
    piece, at, _ = file_pieces(sharded.storage.source, 0, sharded.nbytes)[1]  # the second rank's rows
    flip_byte(piece.path, piece.offset + at + 5)
    for name in ("f.pt", "f.safetensors"):
        code, _, err = cli("convert", flipped, "-o", tmp_path / name)
        assert code == 2 and "CRC-32 mismatch" in err and not (tmp_path / name).exists(), err

    damaged = tmp_path / "damaged"  # a piece cut short: found when the tensor is put together
    shutil.copytree(out, damaged)
    with open(damaged / "__1_0.distcp", "r+b") as f:
        f.truncate(os.path.getsize(damaged / "__1_0.distcp") // 2)
    code, _, err = cli("convert", damaged, "-o", tmp_path / "d.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "d.safetensors").exists()

    os.unlink(out / "__1_0.distcp")  # a rank's file missing
    code, _, err = cli("inspect", out)
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1


def _torch_save_dtensors(rank, world, out, initfile):
    """torch.save of DTensor state dicts, as FSDP2 / tensor-parallel scripts write them per rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{initfile}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        if world == 1:  # FSDP2 on one rank: every DTensor holds the whole parameter
            from torch.distributed.fsdp import fully_shard

            net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
            torch.save(net.state_dict(), f"{out}/plain.pt")
            fully_shard(net, mesh=mesh)
            torch.save({"model": net.state_dict(), "step": 7}, f"{out}/fsdp2.pt")
            dist.barrier()
            return
        w = torch.randn(7, 5)
        torch.save({"layers.0.weight": distribute_tensor(w, mesh, [Shard(0)])}, f"{out}/shard{rank}.pt")
        from torch.distributed.fsdp import fully_shard  # FSDP2 over two ranks: uneven Shard(0) pieces

        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 5))
        if rank == 0:
            torch.save(net.state_dict(), f"{out}/plain2.pt")
        fully_shard(net, mesh=mesh)
        os.makedirs(f"{out}/ranks", exist_ok=True)
        torch.save({"model": net.state_dict(), "step": 9}, f"{out}/ranks/model_rank{rank}.pt")
        torch.save({"norm.weight": distribute_tensor(torch.ones(5), mesh, [Replicate()])}, f"{out}/repl{rank}.pt")
        torch.save({"p": DTensor.from_local(torch.ones(2), mesh, [Partial()])}, f"{out}/partial{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_torch_saved_dtensors(tmp_path, cli):
    """FSDP2 state dicts saved with torch.save hold DTensors (mesh, placements, local tensor):
    torch.load(weights_only=True) refuses them unless torch.distributed.tensor is imported. Read
    here without it, as plain tensors, when each local tensor is the whole value; one rank's shard
    (or partial sum) is one clear line instead of a silently partial checkpoint."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not built")
    _spawn(_torch_save_dtensors, 1, str(tmp_path), tmp_path)
    _spawn(_torch_save_dtensors, 2, str(tmp_path), tmp_path)

    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    ck = cs.load(tmp_path / "fsdp2.pt")
    assert ck.source.lazy and ck.sd_path == ("model",) and any("DTensor" in n for n in ck.notes)
    got = ck.torch_state_dict()
    assert list(got) == list(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    code, out, err = cli("strip-prefix", tmp_path / "fsdp2.pt", "--prefix", "0.", "--partial", "-o", tmp_path / "s.pt")
    assert code == 0, err
    saved = torch.load(tmp_path / "s.pt", weights_only=True)  # plain tensors: no torch.distributed needed
    assert saved["step"] == 7 and torch.equal(saved["model"]["weight"], plain["0.weight"])
    assert type(saved["model"]["weight"]) is torch.Tensor
    assert cli("scan", tmp_path / "fsdp2.pt")[0] == 0  # the parts torch itself allows for DTensors

    # the folder of both ranks' files: put back together, equal to the unsharded model
    plain2 = torch.load(tmp_path / "plain2.pt", weights_only=True)
    ck = cs.load(tmp_path / "ranks")
    assert ck.source.format == "dtensor-ranks" and ck.sd_path == ("model",) and ck.wrapper["step"] == 9
    assert ck.source.lazy and isinstance(ck.state["0.weight"].storage.source, AssembledBytes)
    assert ck.state["0.weight"].shape == tuple(plain2["0.weight"].shape)  # from the pieces' shapes, unread
    got = ck.torch_state_dict()
    assert list(got) == list(plain2) and all(torch.equal(got[k], plain2[k]) for k in plain2)
    code, _, err = cli("convert", tmp_path / "ranks", "-o", tmp_path / "full.safetensors")
    assert code == 0, err
    from safetensors.torch import load_file

    full = load_file(tmp_path / "full.safetensors")
    assert all(torch.equal(full[k], plain2[k]) for k in plain2)
    # a foreign global in the rank files: refused by default, recorded with --inert-pickle
    import zipfile

    os.makedirs(tmp_path / "foreign")
    for r in (0, 1):
        with zipfile.ZipFile(tmp_path / "ranks" / f"model_rank{r}.pt") as z:
            recs = {n: z.read(n) for n in z.namelist()}
        pkl = next(n for n in recs if n.endswith("/data.pkl"))
        at = recs[pkl].rindex(b"K\t")  # the step, 9, as BININT1 -> fractions.Fraction()
        recs[pkl] = recs[pkl][:at] + b"cfractions\nFraction\n)R" + recs[pkl][at + 2:]
        with zipfile.ZipFile(tmp_path / "foreign" / f"r{r}.pt", "w") as z:
            for n, data in recs.items():
                z.writestr(n, data)
    code, _, err = cli("inspect", tmp_path / "foreign")
    assert code == 2 and "fractions.Fraction" in err and "--inert-pickle" in err
    ck = cs.load(tmp_path / "foreign", trust_pickle="inert")
    assert all(torch.equal(v, plain2[k]) for k, v in ck.torch_state_dict().items())

    os.rename(tmp_path / "ranks" / "model_rank1.pt", tmp_path / "rank1.moved")  # one rank alone: refused
    torch.save({"model": {"x": torch.ones(1)}, "step": 9}, tmp_path / "ranks" / "other.pt")
    code, _, err = cli("inspect", tmp_path / "ranks")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err

    for r in (0, 1):
        assert torch.equal(cs.load(tmp_path / f"repl{r}.pt").torch_state_dict()["norm.weight"], torch.ones(5))
        for name, says in ((f"shard{r}.pt", "one rank's piece"), (f"partial{r}.pt", "partial sum")):
            code, _, err = cli("convert", tmp_path / name, "-o", tmp_path / "x.safetensors")
            assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
            assert "full_state_dict" in err and not (tmp_path / "x.safetensors").exists()


def _torch_save_fsdp1_sharded(rank, world, out, initfile):
    """FSDP1 with SHARDED_STATE_DICT, each rank torch.save-ing its state dict of ShardedTensors."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    warnings.simplefilter("ignore")  # FSDP1 and ShardedTensor deprecation notices
    dist.init_process_group("gloo", init_method=f"file://{initfile}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the last layer has one row: the second rank holds no piece of it
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
        if rank == 0:
            torch.save(net.state_dict(), f"{out}/plain.pt")
        model = FSDP(net, device_id=torch.device("cpu"), use_orig_params=True)
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            sd = model.state_dict()
        os.makedirs(f"{out}/fsdp1", exist_ok=True)
        torch.save({"model": sd, "step": 4}, f"{out}/fsdp1/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp1_sharded_state_dict_rank_files_are_put_together(tmp_path, cli):
    """FSDP1's SHARDED_STATE_DICT holds ShardedTensors, which torch.load cannot even read without
    a process group ("Need to initialize default process group"). A folder of the ranks' files
    is read here without one, torch.distributed._shard's classes recorded inert (its nested
    ShardedTensor.ProcessGroupState included), each parameter put together from the ranks' pieces
    -- a rank may hold none -- equal to the unsharded model. One rank's file alone is one line."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not built")
    _spawn(_torch_save_fsdp1_sharded, 2, str(tmp_path), tmp_path)
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    ck = cs.load(tmp_path / "fsdp1")
    assert ck.source.format == "dtensor-ranks" and ck.sd_path == ("model",) and ck.wrapper["step"] == 4
    got = ck.torch_state_dict()
    assert list(got) == list(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    code, _, err = cli("strip-prefix", tmp_path / "fsdp1", "--prefix", "0.", "--partial", "-o", tmp_path / "s.pt")
    assert code == 0, err
    saved = torch.load(tmp_path / "s.pt", weights_only=True)  # plain tensors: loads anywhere
    assert saved["step"] == 4 and torch.equal(saved["model"]["weight"], plain["0.weight"])
    assert torch.equal(saved["model"]["3.weight"], plain["3.weight"])
    code, _, err = cli("inspect", tmp_path / "fsdp1" / "rank1.pt")
    assert code == 2 and "ShardedTensor" in err and "folder" in err and len(err.strip().splitlines()) == 1, err


class _Payload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_dcp_metadata_never_runs_code(trained, tmp_path, cli):
    """torch's reader pickle.load()s .metadata; here its globals are checked first and it is
    unpickled inert. A payload is refused with nothing run; a storage entry pointing out of the
    folder is refused."""
    _, folder = trained
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)  # the test trusts its own file
    canary = tmp_path / "canary"
    meta.planner_data = {"x": _Payload(f"touch {canary}")}
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(UnsafePickleError) as e:
        cs.load(folder)
    assert "system" in str(e.value) and not canary.exists()
    code, _, err = cli("inspect", folder)
    assert code == 2 and "nothing was executed" in err and not canary.exists()

    meta.planner_data = {}
    index = next(iter(meta.storage_data))
    info = meta.storage_data[index]
    info.relative_path = "../../etc/passwd"
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(CorruptCheckpointError) as e:
        cs.load(folder)
    assert "outside its folder" in str(e.value)


def test_dcp_scan_reads_every_embedded_archive(tmp_path, cli):
    """A .distcp file is many torch.save archives end to end: scan reads each one the metadata
    points to, so a payload saved as a non-tensor value is found; loading refuses it unrun."""
    canary = tmp_path / "canary"
    folder = tmp_path / "ck"
    _save({"model": {"w": torch.ones(2, 2), "b": torch.zeros(2)}, "evil": _Payload(f"touch {canary}"), "step": 1},
          folder)
    rep = cs.scan(str(folder))
    kinds = [f["format"] for f in rep["files"]]
    assert kinds[0] == "dcp-metadata" and "dcp-data" in kinds
    assert rep["files"][0]["unsafe"] == []  # DCP's own classes are expected in .metadata
    data = next(f for f in rep["files"] if f["format"] == "dcp-data")
    assert len(data["pickles"]) == 4  # w, b, evil, step: one archive each
    assert rep["unsafe"] == ["posix.system"]
    code, out, _ = cli("scan", folder)
    assert code == 1 and "posix.system" in out
    code, _, err = cli("inspect", folder)
    assert code == 2 and "system" in err and "nothing was executed" in err
    code, out, err = cli("inspect", "--inert-pickle", folder)
    assert code == 0 and "evil: posix.system (inert)" in out, err
    assert not canary.exists()


def test_lightning_sharded_folder_merges_trainer_state(trained, tmp_path, cli):
    """Lightning's sharded strategies put the trainer state in meta.pt beside the DCP files:
    merged into the wrapper (as Lightning's consolidation does); an unsafe meta.pt is left out
    with a note, the weights still read."""
    import fractions

    _, folder = trained
    torch.save({"epoch": 3, "global_step": 120, "loops": {"fit_loop": {}}, "pytorch-lightning_version": "2.4.0"},
               folder / "meta.pt")
    ck = cs.load(folder)
    assert ck.wrapper["epoch"] == 3 and ck.wrapper["step"] == 7 and ck.sd_path == ("state_dict",)
    assert any("merged Lightning's meta.pt" in n for n in ck.notes)
    code, _, err = cli("convert", folder, "-o", tmp_path / "one.ckpt")
    assert code == 0, err
    assert torch.load(tmp_path / "one.ckpt", weights_only=True)["global_step"] == 120

    torch.save({"epoch": 3, "odd": fractions.Fraction(1, 3)}, folder / "meta.pt")
    ck = cs.load(folder)
    assert "epoch" not in ck.wrapper and any("left out meta.pt" in n and "fractions" in n for n in ck.notes)


def test_dtensor_pieces_are_checked_before_they_are_read():
    """dtensor-ranks checks the pieces' shapes, dtypes and coordinates when the folder is read
    and concatenates them only when the tensor's bytes are needed."""
    from ckptsurgeon.formats.dtensor_ranks import _assemble
    from ckptsurgeon.pickle_dist import DTensorShard
    from ckptsurgeon.refs import TensorRef

    a, b = torch.arange(9.0).reshape(3, 3), torch.arange(6.0).reshape(2, 3)
    piece = lambda t, c, size=(5, 3): DTensorShard(TensorRef.from_torch(t), size, 0, c)  # noqa: E731
    ref = _assemble([piece(b, 1), piece(a, 0)], ("w",))
    assert ref.shape == (5, 3) and ref.storage._torch is None
    assert torch.equal(ref.to_torch(), torch.cat([a, b]))
    for shards, says in (([piece(a, 0), piece(a, 1)], "do not make a [5, 3]"),
                         ([piece(a, 0), piece(b.double(), 1)], "do not make"),
                         ([piece(a, 0), piece(b, 2)], "coordinates [0, 2]"),
                         ([piece(a, 0), piece(b, 1, (5, 4))], "disagree")):
        with pytest.raises(CorruptCheckpointError, match=re.escape(says)):
            _assemble(shards, ("w",))


@pytest.mark.parametrize("combine", [True, False], ids=["crc32_combine", "no-combine"])
def test_pieces_in_files_are_copied_in_the_kernel(tmp_path, monkeypatch, combine, flip_byte):
    """A tensor whose row blocks lie in other files (ranks' records, bigger than the small-record
    cut-off): .pt and .safetensors outputs copy each block's file range and check its CRC (in
    the read-back of the output when CRCs can be combined, from the sources when not)."""
    from ckptsurgeon import zipwrite

    if not combine:
        monkeypatch.setattr(zipwrite, "crc32_combine", None)
    elif zipwrite.crc32_combine is None:
        pytest.skip("no ISA-L crc32_combine here")
    from safetensors.torch import load_file

    from ckptsurgeon.formats.dtensor_ranks import _assemble
    from ckptsurgeon.pickle_dist import DTensorShard
    whole = torch.randn(300, 257)
    for r, rows in enumerate(whole.split([160, 140])):
        torch.save({"w": rows.clone(), "b": torch.ones(3)}, tmp_path / f"r{r}.pt")

    def assembled():
        refs = [cs.load(tmp_path / f"r{r}.pt").state["w"] for r in (0, 1)]
        ref = _assemble([DTensorShard(x, (300, 257), 0, r) for r, x in enumerate(refs)], ("w",))
        assert [p[2] for p in file_pieces(ref.storage.source, 0, ref.nbytes)] == [160 * 257 * 4, 140 * 257 * 4]
        return cs.load(tmp_path / "r0.pt").with_state({"w": ref, "b": torch.zeros(2)})

    with monkeypatch.context() as m:  # never put together in memory
        m.setattr(AssembledBytes, "buffer", lambda self: pytest.fail("assembled in memory"))
        cs.save(assembled(), tmp_path / "out.pt")
        cs.save(assembled(), tmp_path / "out.safetensors")
        assert cs.diff(cs.load(tmp_path / "out.pt"), assembled())["identical"]
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True, mmap=True)["w"], whole)
    assert torch.equal(load_file(tmp_path / "out.safetensors")["w"], whole)
    with zipfile.ZipFile(tmp_path / "out.pt") as z:
        assert z.testzip() is None  # the record's CRC is that of the whole tensor
    data = (tmp_path / "r1.pt").read_bytes()  # one byte of the second block damaged
    flip_byte(tmp_path / "r1.pt", data.index(whole[160:].numpy().tobytes()[:64]) + 1000)
    for name in ("bad.pt", "bad.safetensors"):
        with pytest.raises(CorruptCheckpointError, match="CRC-32 mismatch"):
            cs.save(assembled(), tmp_path / name)
        assert not (tmp_path / name).exists()


def test_dcp_chunks_must_tile_the_tensor(monkeypatch):
    """Chunks whose sizes add up to the tensor's but overlap would leave part of it unwritten
    (garbage from torch.empty): refused when the folder is read."""
    from ckptsurgeon.formats.dcp_chunks import assemble as _assemble
    from ckptsurgeon.refs import TensorRef

    ref = lambda *s: TensorRef.from_torch(torch.zeros(s))  # noqa: E731
    grid = [((r, c), ref(2, 2)) for r in (0, 2) for c in (0, 2)]
    assert _assemble("w", (4, 4), "float32", grid).storage.source.parts is None  # a grid: put together by torch
    assert torch.equal(_assemble("w", (4, 4), "float32", grid).to_torch(), torch.zeros(4, 4))
    rows = [((2, 0), ref(2, 4)), ((0, 0), ref(2, 4))]
    assert len(_assemble("w", (4, 4), "float32", rows).storage.source.parts) == 2
    for pieces, says in (([((0, 0), ref(2, 4)), ((1, 0), ref(2, 4))], "overlap"),
                         ([((0, 0), ref(2, 2)), ((0, 1), ref(2, 2)), ((2, 0), ref(2, 4))], "overlap"),
                         ([((0, 0), ref(2, 4))], "cover 8 of 16"),
                         ([((0, 0), ref(2, 4)), ((3, 0), ref(2, 4))], "does not fit")):
        with pytest.raises(CorruptCheckpointError, match=says):
            _assemble("w", (4, 4), "float32", pieces)
    # a grid is checked without comparing chunks pair by pair; an irregular layout with too many
    # chunks to compare is refused rather than checked in quadratic time
    from ckptsurgeon.errors import UnsupportedError
    from ckptsurgeon.formats import dcp_chunks

    monkeypatch.setattr(dcp_chunks, "_PAIRWISE", 2)
    assert _assemble("w", (4, 4), "float32", grid).shape == (4, 4)
    irregular = [((0, 0), ref(2, 4)), ((2, 0), ref(2, 1)), ((2, 1), ref(2, 3))]
    with pytest.raises(UnsupportedError, match="do not form a grid"):
        _assemble("w", (4, 4), "float32", irregular)
    monkeypatch.setattr(dcp_chunks, "_PAIRWISE", 4096)
    assert _assemble("w", (4, 4), "float32", irregular).to_torch().shape == (4, 4)


def test_a_dcp_chunk_is_checked_against_the_metadata_when_read(tmp_path):
    """Chunk archives are parsed when their bytes are needed; one that holds another shape or
    dtype than the metadata promised is an error then, not wrong data."""
    from ckptsurgeon.formats.dcp import _embedded_tensor

    path = tmp_path / "chunk.pt"
    torch.save(torch.arange(6.0).reshape(2, 3), path)
    size = os.path.getsize(path)
    good = _embedded_tensor(str(path), 0, size, "w", (2, 3), "float32")
    assert torch.equal(good.to_torch(), torch.arange(6.0).reshape(2, 3))
    for shape, dtype in (((3, 2), "float32"), ((2, 3), "float16")):
        bad = _embedded_tensor(str(path), 0, size, "w", shape, dtype)
        with pytest.raises(CorruptCheckpointError, match="the metadata says"):
            bad.read_bytes()
