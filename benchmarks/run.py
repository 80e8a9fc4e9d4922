"""Speed and memory of ckpt-surgeon against `cp` and the naive torch path, in one table.

    python benchmarks/run.py --sizes 0.5,2,8 [--repeat 4] [--naive-max 4] [--mem-cap 1GiB] [--out bench-out]
                             [--many 50000]

For each size it writes a torch zip checkpoint of ~300 float32 tensors with `module.` keys (an
OrderedDict with `_metadata`, like a DataParallel state dict) plus a safetensors copy and a
"finetuned" copy with three tensors changed, warms the page cache, then runs every operation as
its own process: wall time (median of --repeat) and peak memory from wait4 (RSS, which counts
mapped file pages) and from sampling /proc/PID/status (RssAnon: the process's own memory).
Ratios are against `cp` (or reading both files once, for diff) measured in the same run: each
run of an operation is paired with a run of its baseline right before or after it (alternating),
and an operation's ratio is the geometric mean of its per-pair ratios over an even number of
rounds (see interleaved; use an even --repeat). A second column divides the op's fastest run
by its baseline's fastest (timeit's convention: what each does when the VM lets it). Every run starts
after a sync (untimed), and each group of operations runs with only the files it reads in the
page cache (see cache_only). Pass
`--out /dev/shm/bench` to take the disk (and its write-back) out of the comparison.
It runs the ``ckpt-surgeon`` beside the Python that runs it: for the figures a user gets, run it
from a regular install (``pip install .`` into a fresh venv) and from outside the source tree. An
editable install's import hook (``pip install -e``, what ``make install`` makes) cost ~40 ms per
process here (tiny strip-prefix 0.10-0.12 s against 0.14-0.16 s), and under the source tree
``python -c`` imports ``ckptsurgeon`` from it, where the first-party plugins are not importable.
`--many N` adds a checkpoint of N small tensors (per-tensor costs, as in a mixture of experts),
each operation paired with the naive path it replaces. With a writable cgroup-v1 memory controller it also runs strip-prefix and diff on the largest
file under a memory cap several times smaller than the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PY = sys.executable
CLI = str(Path(PY).with_name("ckpt-surgeon"))
CGROUP = Path("/sys/fs/cgroup/memory/ckpt_surgeon_bench")

NAIVE_STRIP = """
import sys, torch
from collections import OrderedDict
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=sys.argv[3] == "mmap")
new = OrderedDict((k[len("module."):], v) for k, v in sd.items())
new._metadata = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd._metadata.items())
torch.save(new, sys.argv[2])
"""
NAIVE_ST = """
import sys
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
save_file({k[len("module."):]: v for k, v in sd.items()}, sys.argv[2])
"""
NAIVE_CAST = """
import sys, torch
from collections import OrderedDict
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=True)
new = OrderedDict((k, v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sd.items())
new._metadata = sd._metadata
torch.save(new, sys.argv[2])
"""
NAIVE_DIFF = """
import sys, torch
a = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
b = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
print(sum(1 for k in a if not torch.equal(a[k], b[k])))
"""
GEN = """
import sys, torch
from collections import OrderedDict
size, path = float(sys.argv[1]), sys.argv[2]
n = 300
per = int(size * (1 << 30) / 4 / n)
side = int(per ** 0.5)
g = torch.Generator().manual_seed(0)
sd = OrderedDict()
for i in range(n):
    sd[f"module.layer{i // 3}.block{i % 3}.weight"] = torch.randn(side, side, generator=g)
sd._metadata = OrderedDict([("", {"version": 1}), ("module", {"version": 1})])
torch.save(sd, path)
"""
FINETUNE = """
import sys, torch, ckptsurgeon as cs
ck = cs.load(sys.argv[1])
state = dict(ck.state)
for k in list(state)[10:13]:
    state[k] = state[k].to_torch() + 0.01
cs.save(ck.with_state(state), sys.argv[2])
"""


IN_PROCESS = """
import sys, time
import ckptsurgeon as cs
op, src, out = sys.argv[1:4]
fn = {"extract": cs.extract, "strip-prefix": cs.strip_prefix}[op]  # imports and plugins: not timed
t0 = time.perf_counter()
ck = cs.load(src)
new, _ = fn(ck, sys.argv[4].split(",")) if op == "extract" else fn(ck)
cs.save(new, out)
print("ELAPSED", time.perf_counter() - t0)
"""


def run(cmd, *, stdout=subprocess.DEVNULL, cgroup: Path | None = None, env=None,
        self_timed: bool = False) -> tuple[float, int, int, int]:
    """(wall seconds, peak RSS KiB from wait4, peak RssAnon KiB sampled, exit code).
    ``self_timed``: the command prints "ELAPSED <seconds>" (time measured inside the process,
    after its imports) and that is the time returned."""
    if self_timed:
        stdout = subprocess.PIPE
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=dict(os.environ, **(env or {})))
    peak_anon = [0]
    stop = threading.Event()

    def sample():
        status = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                with open(status) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
            except OSError:
                pass
            stop.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    said = proc.stdout.read().decode(errors="replace") if self_timed else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if self_timed:
        proc.stdout.close()
        wall = float(next(line.split()[1] for line in said.splitlines() if line.startswith("ELAPSED ")))
    stop.set()
    th.join()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        print(f"  ! {' '.join(map(str, cmd))[:160]} exited {code}: {err.strip()[-300:]}", file=sys.stderr)
    return wall, usage.ru_maxrss, peak_anon[0], code


def interleaved(ops, repeat: int, cleanup=None, primer=None) -> list[dict]:
    """Run every op ``repeat`` times, each run of an op right next to a run of its baseline.

    Each round runs an op and its baseline as a pair, baseline first in even rounds and second in
    odd ones, and an op's ratio is the geometric mean of its per-pair ratios over an even number
    of rounds: if running first (or second) slows a process by some factor, that factor cancels
    between the two orders (the median would pick whichever order had more rounds). On these VMs where a run
    stands matters as much as what it does: memory freed a few seconds earlier has been handed
    back to the host (virtio-balloon free page reporting), and the next process to fill the page
    cache pays the host's page faults -- a 2 GiB cp took 1.0-1.8 s right after another 2 GiB
    file was deleted and 2.0-2.2 s when it started 5 s later; in a pair, whichever ran first
    after a different kind of operation took 2.1-3.1 s and the second 0.9-1.5 s. So ``primer``
    (an untimed cp of the same size, deleted at once) runs before each pair: both runs then
    start with freshly freed memory, the faster state and the stricter test of the fixed costs.
    Baselines (ops named as some op's ``base``) only run in those pairs; their row gives the
    median of all their runs.
    """
    by_name = {name: (cmd, kw) for name, cmd, _base, kw in ops}
    bases = {base for _n, _c, base, _k in ops if base}
    walls = {name: [] for name, *_ in ops}
    paired = {name: [] for name, *_ in ops}  # the baseline run next to each run of an op
    peak = {name: [0, 0, 0] for name, *_ in ops}

    def once(name, cmd, kw):
        if cleanup:
            cleanup()
        w, rss, anon, code = run(cmd, **kw)
        p = peak[name]
        p[0], p[1], p[2] = max(p[0], rss), max(p[1], anon), code
        return w

    for rnd in range(repeat):
        for name, cmd, base, kw in ops:
            if name in bases:
                continue
            if not base:
                walls[name].append(once(name, cmd, kw))
                continue
            order = [name, base] if rnd % 2 else [base, name]
            if primer:
                primer()
            got = {}
            for n in order:
                got[n] = once(n, *by_name[n])
            walls[name].append(got[name])
            walls[base].append(got[base])
            paired[name].append(got[base])
    rows = []
    for name, _cmd, base, _kw in ops:
        ratio = base_wall = best = None
        if base:
            ratios = [w / b for w, b in zip(walls[name], paired[name])]
            balanced = ratios[: len(ratios) // 2 * 2] or ratios  # as many rounds with the op first as second
            ratio = statistics.geometric_mean(balanced)
            base_wall = statistics.median(paired[name])
            # fastest against fastest (timeit's convention: what each can do when the VM lets it)
            best = min(walls[name]) / min(paired[name])
        rows.append({"op": name, "base": base, "wall": statistics.median(walls[name]), "walls": walls[name],
                     "base_walls": paired[name], "base_wall": base_wall, "ratio": ratio, "best_ratio": best,
                     "rss_mib": peak[name][0] / 1024, "anon_mib": peak[name][1] / 1024, "code": peak[name][2]})
    return rows


def mib(n):
    return f"{n:,.0f}"


def cgroup_cap(limit_bytes: int) -> Path | None:
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit_bytes))
        try:
            (CGROUP / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        except OSError:
            pass
        return CGROUP
    except OSError:
        return None


def cache_only(work: Path, keep) -> None:
    """Page cache holds exactly ``keep`` (read once) among the benchmark's files: others are
    dropped (written back, then POSIX_FADV_DONTNEED). On this kind of VM a page-cache footprint
    of ~8 GiB made a 2 GiB cp swing between 1.0 and 4.4 s (the host does not back all of the
    guest's RAM), so each phase keeps only the files it reads."""
    os.sync()
    keep = {Path(k) for k in keep}
    for p in work.iterdir():
        if p.is_file() and p not in keep:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    for p in keep:
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)


def bench_size(size: float, work: Path, repeat: int, naive_max: float) -> list[dict]:
    a = work / f"a_{size}g.pt"
    b = work / f"b_{size}g.pt"
    st = work / f"a_{size}g.safetensors"
    out = work / "out.pt"
    out_st = work / "out.safetensors"
    print(f"[{size} GiB] generating ...", file=sys.stderr)
    subprocess.run([PY, "-c", GEN, str(size), str(a)], check=True)
    subprocess.run([CLI, "-q", "convert", str(a), "-o", str(st)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([PY, "-c", FINETUNE, str(a), str(b)], check=True)
    nbytes = a.stat().st_size
    tiny = work / "tiny.pt"
    subprocess.run([PY, "-c", GEN, str(300 * 64 * 4 / (1 << 30)), str(tiny)], check=True)
    layers = ",".join(f"module.layer{i}" for i in range(50))
    extracted = work / f"extracted_{size}g.pt"
    subprocess.run([CLI, "-q", "extract", str(a), "--layers", layers, "-o", str(extracted)], check=True,
                   stdout=subprocess.DEVNULL)

    out_hf = work / "out_shards"

    def rm():
        for p in (out, out_st):
            if p.exists():
                p.unlink()
        if out_hf.exists():
            shutil.rmtree(out_hf)
        os.sync()  # untimed: no run starts while the previous one's dirty pages are written back

    naive = size <= naive_max
    cp_sync = ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh"]
    nofsync = {"CKPT_SURGEON_FSYNC": "0"}
    phases = []  # (files the phase reads, its ops, whether they write outputs)

    def phase(*files, writes=True):
        phases.append((files, [], writes))

    def r(name, cmd, base=None, **kw):
        phases[-1][1].append((name, cmd, base, kw))

    phase(a, tiny)
    r("cp .pt", ["cp", str(a), str(out)])
    r("cp .pt + fsync", cp_sync + [str(a), str(out)])
    r("strip-prefix .pt (ckpt-surgeon, fsync: default)", [CLI, "-q", "strip-prefix", str(a), "-o", str(out)],
      base="cp .pt + fsync")
    r("strip-prefix .pt (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)", [CLI, "-q", "strip-prefix", str(a), "-o", str(out)],
      base="cp .pt", env=nofsync)
    r("strip-prefix .pt (Python API in a running process: load+strip+save, FSYNC=0)",
      [PY, "-c", IN_PROCESS, "strip-prefix", str(a), str(out)], base="cp .pt", env=nofsync, self_timed=True)
    r("rename .pt (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)", [CLI, "-q", "rename", str(a), "--map", r"^module\.=>", "-o",
                                                           str(out)], base="cp .pt", env=nofsync)
    if naive:
        r("strip-prefix .pt naive torch.load/save", [PY, "-c", NAIVE_STRIP, str(a), str(out), "full"], base="cp .pt")
        r("strip-prefix .pt naive, mmap=True", [PY, "-c", NAIVE_STRIP, str(a), str(out), "mmap"], base="cp .pt")
    r("inspect (ckpt-surgeon)", [CLI, "inspect", str(a), "--json"])
    r("ckpt-surgeon --help", [CLI, "--help"])
    r("strip-prefix of a tiny checkpoint (fixed cost per run)", [CLI, "-q", "strip-prefix", str(tiny), "-o",
                                                                  str(out)], env=nofsync)
    phase(st)
    r("cp .safetensors", ["cp", str(st), str(out_st)])
    r("cp .safetensors + fsync", cp_sync + [str(st), str(out_st)])
    r("strip-prefix .safetensors (ckpt-surgeon, fsync: default)", [CLI, "-q", "strip-prefix", str(st), "-o",
                                                                   str(out_st)], base="cp .safetensors + fsync")
    r("strip-prefix .safetensors (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)",
      [CLI, "-q", "strip-prefix", str(st), "-o", str(out_st)], base="cp .safetensors", env=nofsync)
    r("convert to Hugging Face shards, --max-shard-size 512MB (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)",
      [CLI, "-q", "convert", str(st), "-o", str(out_hf), "--max-shard-size", "512MB"], base="cp .safetensors",
      env=nofsync)
    if naive:
        r("strip-prefix .safetensors naive load_file/save_file", [PY, "-c", NAIVE_ST, str(st), str(out_st)],
          base="cp .safetensors")
    phase(a, extracted)
    r("cp of a file the size of the extracted part", ["cp", str(extracted), str(out)])
    r("cp + fsync of a file the size of the extracted part", cp_sync + [str(extracted), str(out)])
    r("extract half the layers (ckpt-surgeon, fsync: default)",
      [CLI, "-q", "extract", str(a), "--layers", layers, "-o", str(out)],
      base="cp + fsync of a file the size of the extracted part")
    r("extract half the layers (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)",
      [CLI, "-q", "extract", str(a), "--layers", layers, "-o", str(out)],
      base="cp of a file the size of the extracted part", env=nofsync)
    r("extract half the layers (Python API in a running process: load+extract+save, FSYNC=0)",
      [PY, "-c", IN_PROCESS, "extract", str(a), str(out), layers],
      base="cp of a file the size of the extracted part", env=nofsync, self_timed=True)
    phase(a)  # a computed surgery: against the naive path (no cp can do it)
    if naive:
        r("cast to bfloat16 naive torch.load(mmap=True)/.to/torch.save", [PY, "-c", NAIVE_CAST, str(a), str(out)])
    r("cast to bfloat16 (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)",
      [CLI, "-q", "cast", str(a), "--dtype", "bfloat16", "-o", str(out)],
      base="cast to bfloat16 naive torch.load(mmap=True)/.to/torch.save" if naive else None, env=nofsync)
    phase(a, b, writes=False)  # diff reads only: no page cache to fill, no primer needed
    r("read both files (cat)", ["cat", str(a), str(b)])
    r("diff (ckpt-surgeon)", [CLI, "-q", "diff", str(a), str(b), "--json"], base="read both files (cat)")
    if naive:
        r("diff naive load both + torch.equal", [PY, "-c", NAIVE_DIFF, str(a), str(b)], base="read both files (cat)")
    def primer(src):
        def prime():
            scratch = work / "primer.tmp"
            subprocess.run(["cp", str(src), str(scratch)], check=True)
            scratch.unlink()
            os.sync()
        return prime

    rows = []
    for files, ops, writes in phases:
        cache_only(work, files)
        rows += interleaved(ops, repeat, cleanup=rm, primer=primer(files[0]) if writes else None)
    for row in rows:
        row["size"] = size
        row["bytes"] = nbytes
    return rows


GEN_MANY = """
import sys, torch
from collections import OrderedDict
from safetensors.torch import save_file
n, pt, st, changed = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
g = torch.Generator().manual_seed(0)
proj = ("gate_proj", "up_proj", "down_proj")
sd = OrderedDict((f"module.layers.{i // 384}.mlp.experts.{i // 3 % 128}.{proj[i % 3]}.weight",
                  torch.randn(16, 8, generator=g)) for i in range(n))
sd._metadata = OrderedDict([("", {"version": 1})])
torch.save(sd, pt)
save_file(dict(sd), st)
for k in list(sd)[n // 2:n // 2 + 3]:
    sd[k] = sd[k] + 0.01
torch.save(sd, changed)
"""
NAIVE_CONVERT = """
import sys, torch
from safetensors.torch import save_file
save_file(dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True)), sys.argv[2])
"""


def bench_many(n: int, work: Path, repeat: int) -> list[dict]:
    """Per-tensor costs: a checkpoint of ``n`` small tensors (a mixture of experts has tens of
    thousands), each operation against the path the tutorials teach, in the same pairs."""
    a, st, b = work / "many.pt", work / "many.safetensors", work / "many_b.pt"
    out, out_st = work / "out.pt", work / "out.safetensors"
    print(f"[{n:,} tensors] generating ...", file=sys.stderr)
    subprocess.run([PY, "-c", GEN_MANY, str(n), str(a), str(st), str(b)], check=True)
    nofsync = {"CKPT_SURGEON_FSYNC": "0"}
    naive_strip = "strip-prefix .pt naive torch.load/save"
    naive_st = "strip-prefix .safetensors naive load_file/save_file"
    naive_conv = "convert .pt -> .safetensors naive torch.load + save_file"
    naive_diff = "diff naive load both + torch.equal"
    ops = [
        (naive_strip, [PY, "-c", NAIVE_STRIP, str(a), str(out), "full"], None, {}),
        ("strip-prefix .pt (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)", [CLI, "-q", "strip-prefix", str(a), "-o", str(out)],
         naive_strip, {"env": nofsync}),
        ("inspect (ckpt-surgeon)", [CLI, "inspect", str(a), "--json"], naive_strip, {}),
        (naive_st, [PY, "-c", NAIVE_ST, str(st), str(out_st)], None, {}),
        ("strip-prefix .safetensors (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)",
         [CLI, "-q", "strip-prefix", str(st), "-o", str(out_st)], naive_st, {"env": nofsync}),
        (naive_conv, [PY, "-c", NAIVE_CONVERT, str(a), str(out_st)], None, {}),
        ("convert .pt -> .safetensors (ckpt-surgeon, CKPT_SURGEON_FSYNC=0)",
         [CLI, "-q", "convert", str(a), "-o", str(out_st)], naive_conv, {"env": nofsync}),
        (naive_diff, [PY, "-c", NAIVE_DIFF, str(a), str(b)], None, {}),
        ("diff (ckpt-surgeon)", [CLI, "-q", "diff", str(a), str(b), "--json"], naive_diff, {}),
    ]

    def rm():
        for p in (out, out_st):
            if p.exists():
                p.unlink()

    cache_only(work, (a, st, b))
    rows = interleaved(ops, repeat, cleanup=rm)
    for row in rows:
        row["size"] = f"{n:,} tensors,"
        row["bytes"] = a.stat().st_size
    for p in (a, st, b):
        p.unlink()
    return rows


def memcap(size: float, work: Path, cap: int) -> list[dict]:
    group = cgroup_cap(cap)
    if group is None:
        return [{"size": size, "op": f"memory cap {cap >> 20} MiB", "note": "no writable cgroup-v1 memory controller"}]
    a, b = work / f"a_{size}g.pt", work / f"b_{size}g.pt"
    out = work / "capped.pt"
    rows = []
    for name, cmd in ((f"strip-prefix under a {cap >> 20} MiB cap", [CLI, "-q", "strip-prefix", str(a), "-o", str(out)]),
                      (f"diff under a {cap >> 20} MiB cap", [CLI, "-q", "diff", str(a), str(b), "--json"])):
        w, rss, anon, code = run(cmd, cgroup=group)
        ok = code in (0, 1) and (name.startswith("diff") or out.exists())
        rows.append({"size": size, "op": name, "wall": w, "rss_mib": rss / 1024, "anon_mib": anon / 1024,
                     "code": code, "ok": ok, "bytes": a.stat().st_size, "base": None})
        if out.exists():
            out.unlink()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| size | operation | wall s | × its baseline (paired baseline's wall) | fastest ÷ fastest | peak RSS MiB "
             "| peak anon MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "wall" not in row:
            lines.append(f"| {_size(row)} | {row['op']} | n/a: {row.get('note', '')} | | | | |")
            continue
        ratio = f"{row['ratio']:.2f}× {row['base']} ({row['base_wall']:.2f} s)" if row.get("ratio") else ""
        best = f"{row['best_ratio']:.2f}×" if row.get("best_ratio") else ""
        status = "" if row.get("ok", True) else " (FAILED)"
        lines.append(f"| {_size(row)} | {row['op']}{status} | {row['wall']:.2f} | {ratio} | {best} | "
                     f"{mib(row['rss_mib'])} | {mib(row['anon_mib'])} |")
    return "\n".join(lines)


def _size(row) -> str:
    size = row["size"]
    return size if isinstance(size, str) else f"{size} GiB"


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    import platform

    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


def compile_bytecode() -> None:
    """Measure what an installed package runs: its modules' bytecode compiled. (An editable
    checkout under PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every module on every
    run: ~0.1 s per process that no installed copy pays.)"""
    import compileall

    import ckptsurgeon
    import ckptsurgeon.plugins

    for pkg in (ckptsurgeon, ckptsurgeon.plugins):
        for d in getattr(pkg, "__path__", []):
            compileall.compile_dir(d, quiet=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,2", help="checkpoint sizes in GiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=4, help="rounds (even: half with the baseline first)")
    ap.add_argument("--naive-max", type=float, default=4.0, help="skip the naive paths above this size (GiB)")
    ap.add_argument("--mem-cap", default="1GiB", help="memory cap for the larger-than-memory run")
    ap.add_argument("--out", default="bench-out", help="working directory (deleted afterwards)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--many", type=int, default=0,
                    help="also time a checkpoint of this many small tensors against the naive paths (e.g. 50000)")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    compile_bytecode()
    rows = []
    try:
        for s in sizes:
            rows += bench_size(s, work, args.repeat, args.naive_max)
            if s == max(sizes):
                cap = int(float(args.mem_cap.rstrip("GiB").rstrip("MiB")) * ((1 << 30) if "G" in args.mem_cap else (1 << 20)))
                rows += memcap(s, work, cap)
            for p in work.glob(f"*_{s}g.*"):
                p.unlink()
        if args.many:
            rows += bench_many(args.many, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if CGROUP.exists():
            try:
                CGROUP.rmdir()
            except OSError:
                pass
    print(f"Machine: {machine()}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
