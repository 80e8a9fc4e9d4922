"""inspect's human-readable report: the header, the wrapper's entries, where the state dict
sits (or the candidates, numbered runs folded), dtypes, prefixes, norms, ties and the module
tree as a rich table. The numbers themselves come from :func:`ckptsurgeon.summary.inspect`.
"""

from __future__ import annotations

from .cliutil import count, echo_notes, human_bytes
from .safeout import one_line

MAX_MODULE_ROWS = 200  # the module tree printed; --json has every row
MAX_WRAPPER_ROWS = 40  # the wrapper's entries printed (a file of 2,000 models side by side printed 2,000 lines)


def fold_candidates(names: list[str], most: int = 8) -> str:
    """Candidate paths with numbered runs folded (an optimizer's per-parameter states:
    ``optimizer_state_dict/state/{0..5}``), at most ``most`` shown."""
    import re

    out: list = []
    runs: dict = {}
    for n in names:
        m = re.fullmatch(r"(.*/)(\d+)", n)
        if m:
            if m.group(1) not in runs:
                runs[m.group(1)] = []
                out.append(m.group(1))
            runs[m.group(1)].append(int(m.group(2)))
        else:
            out.append(n)
    text = []
    for n in out:
        if n in runs:
            nums = sorted(runs[n])
            if len(nums) == 1:
                text.append(f"{n}{nums[0]}")
            elif nums == list(range(nums[0], nums[-1] + 1)):
                text.append(f"{n}{{{nums[0]}..{nums[-1]}}}")
            else:
                text.append(f"{n}{{{','.join(map(str, nums))}}}")
        else:
            text.append(n)
    more = f" and {len(text) - most} more" if len(text) > most else ""
    return ", ".join(text[:most]) + more


def print_inspect(info: dict) -> None:
    from rich.table import Table

    from .cliutil import console

    c = console()
    program = {"torchscript": " (a TorchScript archive: its weights)",
               "torch.export": " (a torch.export program: its weights)"}.get(info.get("program") or "", "")
    c.print(f"{info['path']}  {info['format']}{program}, {human_bytes(info['file_size'] or 0)}"
            + ("" if info["lazy"] else " (loaded fully)"))
    at = info["state_dict_at"]
    if info["wrapper"]:
        c.print("wrapper:")
        entries = list(info["wrapper"].items())
        top = at.split("/")[0] if at is not None else None
        shown = entries[:MAX_WRAPPER_ROWS] + [e for e in entries[MAX_WRAPPER_ROWS:] if e[0] == top]
        for k, v in shown:
            c.print(f"  {one_line(k)}: {one_line(v)}" + ("  <- state dict" if k == top else ""))
        if len(entries) > len(shown):
            c.print(f"  ... and {len(entries) - len(shown)} more entries (all of them: --json)")
    if at is None:
        if info["candidates"]:
            c.print(f"state dict at: not chosen ({len(info['candidates'])} candidates; pick one with --key):")
        else:
            c.print("state dict at: none")
        for cand in info["candidate_sizes"][:20]:
            c.print(f"  {one_line(cand['at'])}: {count(cand['tensors'], 'tensor')}, {human_bytes(cand['bytes'])}")
        if len(info["candidate_sizes"]) > 20:
            c.print(f"  ... and {len(info['candidate_sizes']) - 20} more")
        if info.get("tensor_list") is not None:  # --tensors: every candidate's, named <candidate>/<name>
            print_tensors(info["tensor_list"])
        echo_notes(info["notes"], c.print)
        return
    c.print(f"state dict at: {at}"
            + (f" (candidates: {fold_candidates(info['candidates'])})" if len(info["candidates"]) > 1 else ""))
    c.print(f"tensors: {info['tensors']:,}   parameters: {info['parameters']:,}   bytes: {human_bytes(info['bytes'])}")
    if info["tied"]:
        shown = ", ".join(f"{a} = {b}" for a, b in info["tied"][:4]) + (" ..." if len(info["tied"]) > 4 else "")
        c.print(f"tied: {shown} ({info['unique_parameters']:,} parameters counting each tensor once)",
                markup=False)
    if info["shared_storages"]:
        sh = info["shared_storages"]
        c.print(f"shared storages: {sum(d['tensors'] for d in sh)} tensors are views of {len(sh)} "
                f"storage{'s' if len(sh) > 1 else ''} ({human_bytes(sum(d['bytes'] for d in sh))} in all)",
                markup=False)
    if info["broadcast_views"]:
        bv = info["broadcast_views"]
        c.print(f"broadcast views: {len(bv)} tensor{'s are' if len(bv) > 1 else ' is'} "
                f"{human_bytes(sum(d['dense_bytes'] for d in bv))} dense over "
                f"{human_bytes(sum(d['storage_bytes'] for d in bv))} of storage (expand, stride 0: "
                f"{', '.join(d['name'] for d in bv[:3])}{' ...' if len(bv) > 3 else ''}); "
                "written dense outside a torch zip", markup=False)
    c.print("by dtype: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in info["bytes_by_dtype"].items()))
    if info["prefix"]:
        c.print(f"wrapper prefix on every key: {info['prefix']}  (strip with: ckpt-surgeon strip-prefix)")
    elif info["prefixes_seen"]:
        c.print("prefixes on some keys: " + ", ".join(f"{p['prefix']} ({p['keys']}/{p['of']})" for p in info["prefixes_seen"]))
    if info["norm_layers"]:
        kinds: dict = {}
        for n in info["norm_layers"]:
            kinds[n["kind"]] = kinds.get(n["kind"], 0) + 1
        c.print("norm layers: " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    entries = info["non_tensor_entries"]
    if entries:  # (a Megatron model: one Transformer Engine _extra_state per module, hundreds)
        from .keys import name_list

        c.print(f"non-tensor entries ({len(entries)}): {name_list(entries)}")
    if info.get("nonfinite") is not None:
        bad = info["nonfinite"]
        c.print("NaN/Inf: none" if not bad else "NaN/Inf in: " + ", ".join(
            f"{b['tensor']} (nan {b['nan']}, inf {b['inf']})" for b in bad))
    if info.get("tensor_list") is not None:
        print_tensors(info["tensor_list"])
        echo_notes(info["notes"], c.print)
        return
    label = f"module (below {info['modules_below']})" if info.get("modules_below") else "module"
    t = Table(label, "tensors", "parameters", box=None, pad_edge=False)
    t.columns[0].overflow = "fold"
    rows = module_rows(info["modules"])
    for depth, name, tensors, params in rows[:MAX_MODULE_ROWS]:
        t.add_row("  " * (depth - 1) + one_line(name), str(tensors), f"{params:,}")
    c.print(t)
    if len(rows) > MAX_MODULE_ROWS:
        c.print(f"... and {len(rows) - MAX_MODULE_ROWS} more module rows (all of them: --json)")
    echo_notes(info["notes"], c.print)


def print_tensors(rows: list[dict]) -> None:
    """inspect --tensors: one line per tensor, every one (the user asked for the list). Plain
    padded columns, not a rich Table: rich measured every cell of 50,000 rows for 20 s."""
    import click

    files = any("file" in r for r in rows)
    head = ("tensor", "dtype", "shape", "size") + (("file",) if files else ())
    table = [head] + [(one_line(r["name"]) + (f" = {one_line(r['tied_to'])}" if r.get("tied_to") else ""), r["dtype"],
                       f"[{', '.join(map(str, r['shape']))}]" + (f" {r['layout']}" if r.get("layout") else ""),
                       human_bytes(r["bytes"])) + ((one_line(r.get("file", "")),) if files else ()) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    click.echo("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table))
    if len(rows) > 1:
        click.echo(f"{count(len(rows), 'tensor')} listed, {human_bytes(sum(r['bytes'] for r in rows))}")


def module_rows(nodes: list[dict]) -> list[tuple[int, str, int, int]]:
    """The module table's rows, ``(depth, name, tensors, parameters)``: a run of three or more
    numbered siblings alike in counts and in what they hold (``layers.0`` ... ``layers.31`` of
    a transformer) is one row, ``layers.{0..31} (x32)``, with counts per module."""
    spans = []  # (node, its subtree: the nodes after it that are deeper)
    i = 0
    while i < len(nodes):
        j = i + 1
        while j < len(nodes) and nodes[j]["depth"] > nodes[i]["depth"]:
            j += 1
        spans.append((i, j))
        i += 1

    def shape(i, j):  # what a node holds, independent of its own name
        base = nodes[i]["module"]
        return tuple((n["depth"], n["module"][len(base):], n["tensors"], n["parameters"]) for n in nodes[i:j])

    def numbered(name):
        parent, _, last = name.rpartition(".")
        return (parent, int(last)) if last.isdigit() else None

    rows: list = []
    i = 0
    while i < len(nodes):
        end = spans[i][1]
        num = numbered(nodes[i]["module"])
        run = [(i, end)]
        if num is not None:
            mine = shape(i, end)
            k = end
            while k < len(nodes) and nodes[k]["depth"] == nodes[i]["depth"]:
                nk = numbered(nodes[k]["module"])
                if nk is None or nk != (num[0], num[1] + len(run)) or shape(*spans[k]) != mine:
                    break
                run.append(spans[k])
                k = spans[k][1]
        if len(run) < 3:
            n = nodes[i]
            rows.append((n["depth"], n["module"], n["tensors"], n["parameters"]))
            i += 1
            continue
        label = f"{num[0]}.{{{num[1]}..{num[1] + len(run) - 1}}}" if num[0] else f"{{{num[1]}..{num[1] + len(run) - 1}}}"
        base = nodes[i]["module"]
        for n in nodes[i:end]:
            name = label + n["module"][len(base):]
            rows.append((n["depth"], name + (f" (x{len(run)})" if n is nodes[i] else ""), n["tensors"], n["parameters"]))
        i = run[-1][1]
    return rows
