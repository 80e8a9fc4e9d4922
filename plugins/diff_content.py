"""diff's comparison of everything but tensors: the wrapper and the state dict's other values
as plain summaries (tensors as shape, dtype and hash), compared for strict, type-aware equality
first; deepdiff (~0.2 s to import) only when they differ, its output trimmed where a hostile
pickle would expand without end.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ckptsurgeon.checkpoint import Checkpoint, tensor_info
from ckptsurgeon.dtypes import count
from ckptsurgeon.refs import TensorRef, is_tensor_like
from ckptsurgeon.values import Walk, plain


def shape_dtype(v) -> tuple:
    """(shape, dtype name) of a tensor or stand-in, without reading data."""
    if isinstance(v, TensorRef):
        return tuple(v.shape), v.dtype
    info = tensor_info(v)
    return tuple(info["shape"]), info["dtype"]


def other_content(ck: Checkpoint, with_hashes: bool) -> tuple[Any, bool]:
    """Non-tensor content for deepdiff: the wrapper minus the state dict, tensors as summaries;
    and whether it was cut short (see values.Walk: a hostile pickle can expand without end)."""
    from ckptsurgeon.compare import digest

    walk = Walk()
    hashes: dict[int, str] = {}  # one tensor may sit in many places (a pickle shares objects)

    def summarise(obj):
        if is_tensor_like(obj):
            shape, dtype = shape_dtype(obj)
            s = {"<tensor>": f"{dtype}{list(shape)}"}
            if with_hashes:
                if id(obj) not in hashes:
                    hashes[id(obj)] = digest(obj)
                s["xxh3"] = hashes[id(obj)]
            return s
        if not isinstance(obj, (Mapping, list, tuple)):
            return plain(obj, walk)
        marker = walk.enter(obj)
        if marker is not None:
            return marker
        try:
            if isinstance(obj, Mapping):
                return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): summarise(v)
                        for k, v in obj.items()}
            return [summarise(v) for v in obj]
        finally:
            walk.active.discard(id(obj))

    out = {}
    if isinstance(ck.wrapper, (Mapping, list, tuple)) and (ck.sd_path or not ck.state):  # (a whole file)
        items = ck.wrapper.items() if isinstance(ck.wrapper, Mapping) else enumerate(ck.wrapper)
        for k, v in items:
            if (k,) == tuple(ck.sd_path[:1]) and len(ck.sd_path) == 1:
                continue
            out[str(k)] = summarise(v)
    # "format": "pt" says nothing; an index's total_size / total_parameters follow from the tensors
    header = {k: v for k, v in (ck.st_metadata or {}).items() if k not in ("format", "total_size", "total_parameters")}
    if header or has_header(ck):
        out["__safetensors_metadata__"] = header
    non_tensor = {k: summarise(v) for k, v in ck.state.items() if not is_tensor_like(v)}
    if non_tensor:
        out["__state_dict_non_tensor__"] = non_tensor
    return out, walk.truncated


def has_header(ck: Checkpoint) -> bool:
    """Whether the checkpoint's format has a place for safetensors header metadata."""
    return ck.source is not None and ck.source.format in ("safetensors", "hf-folder")


def same_content(a, b) -> bool:
    """Strict equality of two summaries (types too: 1 vs 1.0 vs True count as different, as for
    deepdiff). False only sends the pair to deepdiff, which has the last word."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_content(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_content(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


#: What deepdiff is handed at most, in nodes over both sides weighted by depth (a node n levels
#: down costs n + 1): deepdiff takes ~0.1 ms a node near the root and ~1 ms forty levels down (it
#: copies the path at each step). Unbounded, a 100,000-item loss history that changed took 12 s
#: and 9 MB of report, and a "billion laughs" pickle, cut at the walk's budget, minutes. Beyond it
#: the rest is counted, not itemised (a note says so): ~1.5 s at most.
DEEPDIFF_BUDGET = 60_000
#: A list longer than this on both sides is itemised by its first LONG_LIST differing positions
#: (and its first LONG_LIST extra items) only.
LONG_LIST = 100
_EQUAL = object()


class _Trim:
    """Both summaries with what is equal left out, for deepdiff (see DEEPDIFF_BUDGET): entries of a
    mapping equal on both sides are dropped; a long list becomes a mapping of its differing
    positions (deepdiff writes a list's index and such a key alike: root['history'][7]); a value
    on one side only, when large, becomes a one-line description. Past the budget, pairs still to
    visit become one marker on both sides (deepdiff sees them equal) and ``cut`` counts them."""

    def __init__(self, budget: int = DEEPDIFF_BUDGET):
        self.left = budget
        self.cut = 0
        self.notes: list[str] = []

    def pair(self, a, b, path: str = "root", depth: int = 0):
        if same_content(a, b):
            return _EQUAL
        if self.left <= 0:
            self.cut += 1
            return "<not itemised>", "<not itemised>"
        self.left -= depth + 1
        if isinstance(a, dict) and isinstance(b, dict):
            ta, tb = {}, {}
            for k, v in a.items():
                if k in b:
                    r = self.pair(v, b[k], f"{path}[{k!r}]", depth + 1)
                    if r is not _EQUAL:
                        ta[k], tb[k] = r
                else:
                    ta[k] = self.one(v, depth + 1)
            for k, v in b.items():
                if k not in a:
                    tb[k] = self.one(v, depth + 1)
            return ta, tb
        if isinstance(a, list) and isinstance(b, list) and max(len(a), len(b)) > LONG_LIST:
            return self.long(a, b, path, depth)
        cost = (_nodes(a, self.left) + _nodes(b, self.left)) * (depth + 1)
        if cost > self.left:  # too large to hand over whole: go into it where both are mappings or lists
            if isinstance(a, list) and isinstance(b, list):
                return self.long(a, b, path, depth)
            return self.one(a, depth), self.one(b, depth)
        self.left -= cost
        return a, b

    def long(self, a: list, b: list, path: str, depth: int):
        common = min(len(a), len(b))
        ta, tb = {}, {}
        differing = 0
        for i in range(common):
            if differing < LONG_LIST:  # itemised (pair compares first)
                r = self.pair(a[i], b[i], f"{path}[{i}]", depth + 1)
                if r is not _EQUAL:
                    ta[i], tb[i] = r
                    differing += 1
            elif not same_content(a[i], b[i]):  # counted only
                differing += 1
        for seq, out in ((a, ta), (b, tb)):
            for i in range(common, min(len(seq), common + LONG_LIST)):
                out[i] = self.one(seq[i], depth + 1)
        extra = max(len(a), len(b)) - common
        if differing > LONG_LIST or extra > LONG_LIST:
            one_side = f", {count(extra, 'item')} on one side only" if extra else ""
            self.notes.append(
                f"{path}: a list of {count(len(a), 'item')} against {len(b):,}, {count(differing, 'position')} "
                f"differ{'s' if differing == 1 else ''}{one_side}: the first {min(differing, LONG_LIST)} differing and {min(extra, LONG_LIST)} extra "
                "itemised")
        return ta, tb

    def one(self, v, depth: int):
        """A value on one side only: itself, or where large a one-line description."""
        cost = _nodes(v, 1000) * (depth + 1)
        if cost > 1000 * (depth + 1) or cost > self.left:
            kind = "mapping" if isinstance(v, dict) else "list" if isinstance(v, list) else type(v).__name__
            return f"<{kind} of {count(_count(v), 'item')}: not itemised>"
        self.left -= cost
        return v


def _nodes(v, cap: int) -> int:
    """Nodes in a summary, counted up to ``cap``."""
    n, todo = 0, [v]
    while todo and n <= cap:
        x = todo.pop()
        n += 1
        if isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return n


def _count(v) -> int:
    return len(v) if isinstance(v, (dict, list, tuple)) else 1


def deep_diff(oa, ob) -> tuple[dict, list[str]]:
    """deepdiff of two summaries within DEEPDIFF_BUDGET, and notes on what was not itemised."""
    trim = _Trim()
    r = trim.pair(oa, ob)
    if r is _EQUAL:
        return {}, []
    from deepdiff import DeepDiff  # importing it costs ~0.2 s: only paid to describe a difference

    # ignore_private_variables: deepdiff skips keys starting with "__" by default, which hid every
    # difference under __state_dict_non_tensor__ / __safetensors_metadata__ (and a wrapper's own
    # "__version__"-style keys)
    # threshold_to_diff_deeper=0: keys added and removed are itemised however few keys two mappings
    # share (deepdiff >= 8 otherwise reports a mapping sharing under a third of its keys as one
    # replaced value; leaving equal entries out above would change which, and 7 always itemised).
    # zip_ordered_iterables: lists compared position by position, as the long ones are above; its
    # pairing of list items by hash took [0, 1] and [0, True] for equal (1 == True), so a flag that
    # became a number was "other content differs" with nothing itemised.
    options = {"verbose_level": 2, "ignore_private_variables": False, "zip_ordered_iterables": True}
    try:
        dd = DeepDiff(r[0], r[1], threshold_to_diff_deeper=0, **options)
    except (TypeError, ValueError):  # deepdiff 7: no such parameter
        dd = DeepDiff(r[0], r[1], **options)
    notes = trim.notes[:20] + ([f"... and {len(trim.notes) - 20} more such lists"] if len(trim.notes) > 20 else [])
    if trim.cut:
        notes.append(f"the other content differs in more places than itemised: {count(trim.cut, 'more differing part')} "
                     "counted, not itemised")
    return (json.loads(dd.to_json()) if dd else {}), notes
