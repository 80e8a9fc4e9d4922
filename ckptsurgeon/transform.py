"""Generic, surgery-agnostic changes to a Checkpoint: rename keys, keep a subset of keys.

Both keep tensor references as they are (no bytes read or copied) and carry ``_metadata``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

from .checkpoint import Checkpoint, rename_nested
from .dtypes import count
from .errors import KeyCollisionError
from .keys import filter_metadata, module_of, rename_metadata


def rename_keys(ck: Checkpoint, fn: Callable[[str], str]) -> tuple[Checkpoint, "OrderedDict[str, str]"]:
    """New checkpoint with every key ``k`` renamed to ``fn(k)``; collisions are an error.

    Returns (checkpoint, {old: new} for the keys that changed).
    """
    new_state: OrderedDict = OrderedDict()
    origin: dict[str, list[str]] = {}
    changed: OrderedDict = OrderedDict()
    for k, v in ck.state.items():
        nk = fn(k)
        origin.setdefault(nk, []).append(k)
        new_state[nk] = v
        if nk != k:
            changed[k] = nk
    if "" in origin and "" not in ck.state:  # a name stripped away entirely (strip-prefix --prefix w of 'w')
        from .errors import SelectionError

        raise SelectionError(f"renaming {origin[''][0]!r} would leave an empty name, nothing written",
                             hint="a prefix or rule must leave some of each name")
    collisions = {nk: olds for nk, olds in origin.items() if len(olds) > 1}
    if collisions:
        def sources(olds):  # every key mapped onto one name (20,000 of them made a 500 KB line)
            return " + ".join(olds[:4]) + (f" + {len(olds) - 4} more" if len(olds) > 4 else "")

        sample = "; ".join(f"{sources(o)} -> {n}" for n, o in list(collisions.items())[:5])
        more = f" (and {len(collisions) - 5} more)" if len(collisions) > 5 else ""
        raise KeyCollisionError(f"{count(len(collisions), 'key collision')}, nothing written: {sample}{more}",
                                collisions=collisions)
    nested = (rename_nested(ck.nested, {k: changed.get(k, k) for k in ck.state}, bare=not ck.sd_path)
              if ck.nested and changed else ck.nested)
    return ck.replace(state=new_state, metadata=rename_metadata(ck.metadata, fn), nested=nested), changed


def keep_keys(ck: Checkpoint, keys: Iterable[str]) -> Checkpoint:
    """New checkpoint holding only ``keys`` (in the original order)."""
    wanted = set(keys)
    state = OrderedDict((k, v) for k, v in ck.state.items() if k in wanted)
    prefixes = set()
    for m in {module_of(k) for k in state}:
        parts = m.split(".") if m else []
        for i in range(len(parts) + 1):
            prefixes.add(".".join(parts[:i]))
    return ck.replace(state=state, metadata=filter_metadata(ck.metadata, prefixes.__contains__))
