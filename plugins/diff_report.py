"""diff's report as people read it (``human``), and its bar chart of change per module (``plot``)."""

from __future__ import annotations

import json
from collections import OrderedDict

from ckptsurgeon import cliutil
from ckptsurgeon.dtypes import count
from ckptsurgeon.errors import SelectionError
from ckptsurgeon.safeout import one_line


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SelectionError("--plot needs matplotlib", hint="pip install 'ckpt-surgeon[plot]'") from None
    mods = [m for m in report["modules"]]
    names = [m["module"] for m in mods]
    vals = [100 * (m["rel_l2"] or 0) for m in mods]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(names)), 4))
    ax.bar(range(len(names)), vals, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("relative L2 change (%)")
    ax.set_title("change per module")
    fig.tight_layout()
    from ckptsurgeon.atomic import check_output_path

    check_output_path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _value_change(x: dict) -> str:
    if x.get("rel_l2") is None:
        return ""
    return f" (max|a-b| {x['max_abs']:.3g}, rel L2 {100 * x['rel_l2']:.3g}%)"


#: rows of each list the printed report shows (a diff of two 3,000-module models printed 3,000
#: module rows); --json has every one
ROWS = 30


def _more(c, items: list, what: str) -> None:
    if len(items) > ROWS:
        c.print(f"... and {len(items) - ROWS} more {what} (every one: --json)")


def human(r: dict) -> None:
    from rich.table import Table

    c = cliutil.console()
    c.print(f"A: {r['a']['path']} ({r['a']['format']}, {count(r['a']['tensors'], 'tensor')})")
    c.print(f"B: {r['b']['path']} ({r['b']['format']}, {count(r['b']['tensors'], 'tensor')})")
    if r["alignment"]["applied"]:
        cliutil.echo_notes([r["alignment"]["note"]], c.print)
    for label, items in (("only in A", r["only_in_a"]), ("only in B", r["only_in_b"])):
        if items:
            c.print(f"{label} ({len(items)}): " + ", ".join(map(one_line, items[:20])) + (" ..." if len(items) > 20 else ""))
    for side, items in (("A", r.get("copies_only_in_a", ())), ("B", r.get("copies_only_in_b", ()))):
        for x in items[:ROWS]:
            c.print(f"  {one_line(x['name'])} (only in {side}) holds the same values as {one_line(x['same_as'])}: a tied weight "
                    "stored as a copy?")
    for side, other, items in (("A", "B", r["tied_only_in_a"]), ("B", "A", r["tied_only_in_b"])):
        if items:
            c.print(f"tied in {side}, stored once in {other} ({len(items)}): " + ", ".join(
                f"{one_line(x['name'])} = {one_line(x['tied_to'])}" for x in items[:20]) + (" ..." if len(items) > 20 else ""))
    for x in r["renamed"][:ROWS]:
        c.print(f"renamed: {one_line(x['a'])} -> {one_line(x['b'])} (same content)")
    _more(c, r["renamed"], "renames")
    for x in r["shape_changed"][:ROWS]:
        c.print(f"shape: {one_line(x['name'])}: {x['a']} -> {x['b']}")
    _more(c, r["shape_changed"], "shape changes")
    by_change: "OrderedDict[tuple, list]" = OrderedDict()
    for x in r["dtype_changed"]:
        by_change.setdefault((x["a"], x["b"]), []).append(x)
    for (da, db), xs in by_change.items():
        if len(xs) <= 3:
            for x in xs:
                c.print(f"dtype: {one_line(x['name'])}: {da} -> {db}{_value_change(x)}")
        else:  # a whole model cast: one line, the largest change named
            worst = max(xs, key=lambda x: x.get("rel_l2") or 0)
            c.print(f"dtype: {count(len(xs), 'tensor')} {da} -> {db}" + (
                f"; values: largest rel L2 {100 * worst['rel_l2']:.3g}% ({worst['name']}), "
                f"max|a-b| {max(x.get('max_abs') or 0 for x in xs):.3g}" if worst.get("rel_l2") is not None else ""))
    if r["changed"]:
        t = Table("tensor", "max|a-b|", "mean|a-b|", "rel L2", "cosine", "differing", title="changed tensors (most first)")
        t.columns[0].overflow = "fold"  # a narrow terminal wraps the name, never cuts it
        for col in t.columns[1:]:
            col.min_width = len(str(col.header))
        for e in r["changed"][:ROWS]:
            t.add_row(one_line(e["name"]), f"{e['max_abs']:.3g}", f"{e['mean_abs']:.3g}",
                      "n/a" if e["rel_l2"] is None else f"{100 * e['rel_l2']:.3g}%",
                      f"{e['cosine']:.6f}", f"{e['n_diff']}/{e['numel']}")
        c.print(t)
        _more(c, r["changed"], "changed tensors")
    touched = [m for m in r["modules"] if m["changed"]]
    if touched:
        t = Table("module", "changed", "rel L2", title="per module")
        t.columns[0].overflow = "fold"
        for m in touched[:ROWS]:
            t.add_row(one_line(m["module"]), f"{m['changed']}/{m['tensors']}",
                      "n/a" if m["rel_l2"] is None else f"{100 * m['rel_l2']:.3g}%")
        c.print(t)
        _more(c, touched, "changed modules")
    for x in r["nonfinite"][:ROWS]:
        c.print(f"NaN/Inf: {one_line(x['name'])}: " + ", ".join(f"{s} nan={v['nan']} inf={v['inf']}" for s, v in x.items() if s != "name"))
    _more(c, r["nonfinite"], "tensors with NaN/Inf")
    if r["metadata"]:
        c.print("other content:")
        for kind, items in r["metadata"].items():
            if isinstance(items, dict):
                for path, val in list(items.items())[:30]:
                    c.print(f"  {kind}: {path}: {json.dumps(val, default=str)[:160]}")
            else:
                c.print(f"  {kind}: {json.dumps(items, default=str)[:200]}")
    cliutil.echo_notes(r.get("notes"), c.print)
    c.print(r["verdict"])
