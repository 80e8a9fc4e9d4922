"""Facts about state-dict key names: wrapper prefixes, module tree, patterns (no torch). Norm layers
are :mod:`ckptsurgeon.norms`'."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Iterable

from .checkpoint import KNOWN_PREFIXES

BN_KEYS = {"running_mean", "running_var", "num_batches_tracked"}


def detect_prefix(keys: Iterable[str], known: tuple = KNOWN_PREFIXES, partial: bool = False) -> str:
    """The stack of wrapper prefixes every key carries ('module._orig_mod.'), or ''.

    With ``partial=True`` a prefix counts when it is the most common known first component,
    even if not every key has it (Lightning checkpoints with extra top-level modules).
    """
    keys = list(keys)
    if not keys:
        return ""
    stack = ""
    while True:
        found = None
        for p in known:
            full = stack + p
            hits = sum(1 for k in keys if k.startswith(full))
            if hits == len(keys) or (partial and hits and not stack and hits * 2 >= len(keys)):
                found = p
                break
            if partial and stack and hits:
                # under a partial first prefix, stack further prefixes only when all its keys agree
                under = [k for k in keys if k.startswith(stack)]
                if hits == len(under):
                    found = p
                    break
        if not found:
            return stack
        stack += found


#: Wrapper module names found *inside* keys when a submodule, not the whole model, was wrapped:
#: torch.compile per block (``layers.0._orig_mod.attn.wq.weight``: torchtitan and FSDP2 recipes
#: compile each block), FSDP1 auto-wrapping and activation checkpointing saved through
#: ``named_parameters()``. No real module is named so.
INNER_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def drop_inner_wrappers(key: str) -> str:
    """``key`` without wrapper components (INNER_WRAPPERS) anywhere before its leaf name."""
    parts = key.split(".")
    if len(parts) < 2 or not any(p in INNER_WRAPPERS for p in parts[:-1]):
        return key
    return ".".join([p for p in parts[:-1] if p not in INNER_WRAPPERS] + parts[-1:])


def inner_wrappers(keys: Iterable[str]) -> dict:
    """{wrapper component: number of keys carrying it inside} (see INNER_WRAPPERS)."""
    out: dict = {}
    for k in keys:
        for p in set(k.split(".")[:-1]) & set(INNER_WRAPPERS):
            out[p] = out.get(p, 0) + 1
    return out


def prefix_report(keys: Iterable[str]) -> list[dict]:
    """For each known prefix seen at the start of keys: how many keys carry it."""
    keys = list(keys)
    out = []
    for p in KNOWN_PREFIXES:
        n = sum(1 for k in keys if k.startswith(p))
        if n:
            out.append({"prefix": p, "keys": n, "of": len(keys)})
    return out


def top_modules(keys, strip: str = "") -> list[str]:
    """First path components of dotted keys (after removing ``strip``), in first-seen order."""
    seen: dict = {}
    for k in keys:
        bare = k[len(strip):] if strip and k.startswith(strip) else k
        if "." in bare:
            seen.setdefault(bare.split(".", 1)[0], None)
    return list(seen)


def unmatched_hint(missing, keys, strip: str = "") -> str:
    """What to say about patterns that matched nothing: the closest module paths or names for a
    mistyped one (``layer1.0.conv`` for ``layer1.0.cnov``), else the top-level modules."""
    import difflib

    paths: dict = {}
    for k in keys:
        for name in (k, k[len(strip):]) if strip and k.startswith(strip) else (k,):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                paths.setdefault(".".join(parts[:i]), None)
    close = []
    for text in missing:
        if text.startswith("re:") or any(c in text for c in "*?["):
            continue
        close += [c for c in difflib.get_close_matches(text, list(paths), n=3, cutoff=0.75) if c not in close]
    if close:
        return "did you mean " + " or ".join(map(repr, close[:3])) + "?"
    tops = top_modules(keys, strip)
    if tops:
        return f"top-level modules: {', '.join(tops[:12])}"
    keys = list(keys)  # names with no module path (a bare 'weight', 'module.bias'): the names themselves
    return f"its keys: {name_list(keys, 8)}" if keys else "the state dict is empty"


def name_list(names, limit: int = 10) -> str:
    """Names for a one-line report: at most ``limit`` named, the rest counted; a module's
    ``_extra_state`` entries (Transformer Engine: one per module, hundreds in a Megatron model)
    as one count."""
    names = list(names)
    extra = [n for n in names if n == "_extra_state" or n.endswith("._extra_state")]
    rest = [n for n in names if not (n == "_extra_state" or n.endswith("._extra_state"))]
    line = ", ".join(rest[:limit]) + (f" ... and {len(rest) - limit} more" if len(rest) > limit else "")
    if extra:
        line += ("; " if rest else "") + f"{len(extra)} module _extra_state entr{'y' if len(extra) == 1 else 'ies'}"
    return line


def module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def group_by_module(keys: Iterable[str]) -> "OrderedDict[str, list[str]]":
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for k in keys:
        groups.setdefault(module_of(k), []).append(k.rsplit(".", 1)[-1])
    return groups


def module_tree(sizes: "OrderedDict[str, int]", depth: int = 2) -> list[dict]:
    """Parameter counts aggregated by module path down to ``depth`` components, depth first: each
    module right after its parent (a safetensors file orders its keys by dtype first, so a module
    could otherwise land under another module's heading). Siblings keep the order they first
    appear in, except numbered ones (``layer.0``, ``layer.1`` ...), which come in numeric order
    (safetensors' alphabetical order puts ``layer.10`` before ``layer.2``)."""
    agg: dict[str, dict] = {}
    children: dict[str, list[str]] = {"": []}
    for key, numel in sizes.items():
        parts = key.split(".")
        for d in range(1, (min(depth, len(parts) - 1) if len(parts) > 1 else 1) + 1):
            path = ".".join(parts[:d])
            node = agg.get(path)
            if node is None:
                node = agg[path] = {"module": path, "depth": d, "tensors": 0, "parameters": 0}
                children.setdefault(".".join(parts[:d - 1]), []).append(path)
            node["tensors"] += 1
            node["parameters"] += numel
    out: list[dict] = []

    def visit(parent: str) -> None:
        kids = children.get(parent, [])
        lasts = [k.rpartition(".")[2] for k in kids]
        if all(x.isdigit() for x in lasts):
            kids = [k for _, k in sorted(zip(map(int, lasts), kids))]
        for k in kids:
            out.append(agg[k])
            visit(k)

    visit("")
    return out


# --------------------------------------------------------------------------- layer patterns
class Pattern:
    """A layer selector: module path (whole components), glob, or ``re:`` regex."""

    def __init__(self, text: str):
        import fnmatch

        self.text = text
        self.path: str | None = None  # set for a plain module path (matched by lookup in select)
        if text.startswith("re:"):
            try:
                rx = re.compile(text[3:])
            except re.error as e:
                from .errors import SelectionError

                raise SelectionError(f"invalid regex {text!r}: {e}") from None
            self._match = lambda k: rx.search(k) is not None
        elif any(c in text for c in "*?["):
            glob = text
            self._match = lambda k: fnmatch.fnmatchcase(k, glob) or fnmatch.fnmatchcase(k, glob + ".*")
        else:
            path = self.path = text.rstrip(".")
            self._match = lambda k: k == path or k.startswith(path + ".")

    def matches(self, key: str) -> bool:
        return self._match(key)

    def __repr__(self):
        return f"Pattern({self.text!r})"


def parse_patterns(values) -> list[Pattern]:
    """Repeatable, comma-separated selectors -> Patterns (a regex may hold commas only via re:)."""
    out = []
    for v in values or ():
        if v.startswith("re:"):
            out.append(Pattern(v))
            continue
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(Pattern(part))
    return out


def select(keys, patterns: list[Pattern], strip: str = "") -> tuple[list[str], dict]:
    """Keys matched by any pattern (tried on the key and on the key without ``strip``),
    plus {pattern text: match count}."""
    counts = {p.text: 0 for p in patterns}
    by_path: dict[str, list[str]] = {}  # plain module paths: one dict lookup per key prefix
    others = []
    for p in patterns:
        if p.path is not None:
            by_path.setdefault(p.path, []).append(p.text)
        else:
            others.append(p)
    chosen = []
    for k in keys:
        bare = k[len(strip):] if strip and k.startswith(strip) else k
        hits: set[str] = set()
        for cand in (k, bare) if bare is not k else (k,):
            if by_path:
                for i, c in enumerate(cand):
                    if c == "." and cand[:i] in by_path:
                        hits.update(by_path[cand[:i]])
                hits.update(by_path.get(cand, ()))
            hits.update(p.text for p in others if p.matches(cand))
        for text in hits:
            counts[text] += 1
        if hits:
            chosen.append(k)
    return chosen, counts


def filter_metadata(metadata, keep):
    """``_metadata`` without the module paths ``keep`` refuses. What is not a mapping of module
    paths (an odd or hostile file's ``_metadata``: a string, a list, int keys) is carried as it
    is: nothing to filter by."""
    if not isinstance(metadata, Mapping):
        return metadata
    return OrderedDict((m, v) for m, v in metadata.items() if not isinstance(m, str) or keep(m))


def rename_metadata(metadata, fn):
    """Apply a key-renaming function to ``_metadata``'s module paths (renamed entries win);
    entries that are no module path, or a ``_metadata`` that is no mapping, are carried as they are."""
    if not isinstance(metadata, Mapping):
        return metadata
    out: OrderedDict = OrderedDict()
    changed: set = set()
    for mod, value in metadata.items():
        if not isinstance(mod, str):
            out.setdefault(mod, value)
            continue
        probe = (mod + "." if mod else "") + "__leaf__"
        new = fn(probe)
        if new is None:
            continue
        new_mod = new[: -len("__leaf__")].rstrip(".") if new.endswith("__leaf__") else None
        if new_mod is None:
            continue
        if new_mod in out and new_mod in changed and new == probe:
            continue  # an unchanged entry never overrides one that was renamed onto it
        out[new_mod] = value
        if new != probe:
            changed.add(new_mod)
    return out


def align_to_model(ck_keys: list[str], model_keys: list[str]):
    """The key mapping (checkpoint name -> model name) that matches the most names.

    Tries: as is; stripping the checkpoint's wrapper prefix; adding the model's wrapper
    prefix; and re-rooting under one of the model's top-level modules (a backbone-only file
    loaded into a full model).
    """
    model_set = set(model_keys)
    ck_prefix = detect_prefix(ck_keys, partial=True)
    m_prefix = detect_prefix(model_keys)
    candidates = [("as is", lambda k: k)]
    if ck_prefix:
        candidates.append((f"strip {ck_prefix!r}", lambda k, p=ck_prefix: k[len(p):] if k.startswith(p) else k))
    if m_prefix:
        candidates.append((f"add {m_prefix!r}", lambda k, p=m_prefix: p + k))
        if ck_prefix:
            candidates.append((f"strip {ck_prefix!r}, add {m_prefix!r}",
                               lambda k, a=ck_prefix, b=m_prefix: b + (k[len(a):] if k.startswith(a) else k)))
    for t in top_modules(model_keys)[:50]:
        candidates.append((f"under {t + '.'!r}", lambda k, p=t + ".": p + k))
        if ck_prefix:
            candidates.append((f"strip {ck_prefix!r}, under {t + '.'!r}",
                               lambda k, a=ck_prefix, p=t + ".": p + (k[len(a):] if k.startswith(a) else k)))
    for t in top_modules(ck_keys)[:50]:
        candidates.append((f"strip {t + '.'!r}", lambda k, p=t + ".": k[len(p):] if k.startswith(p) else k))
    if inner_wrappers(ck_keys) and not inner_wrappers(model_keys):  # per-block compile / wrap
        candidates += [(f"{how}, drop inner {'/'.join(sorted(inner_wrappers(ck_keys)))}",
                        lambda k, f=f: drop_inner_wrappers(f(k))) for how, f in list(candidates)]
    best = max(candidates, key=lambda c: sum(1 for k in ck_keys if c[1](k) in model_set))
    return best


def align_keys(a_keys: list[str], b_keys: list[str], enabled: bool = True,
               extra_a=(), extra_b=()) -> tuple[dict, dict, dict]:
    """({a_key: common}, {b_key: common}, alignment report): strip each side's wrapper prefix
    when that makes more names meet than comparing them as they are. ``extra_a``/``extra_b``:
    more names of each side (a state dict's non-tensor entries), renamed by the rule the keys
    chose without a say in it; the maps hold them too."""
    all_a = list(dict.fromkeys([*a_keys, *extra_a]))
    all_b = list(dict.fromkeys([*b_keys, *extra_b]))
    plain_a = {k: k for k in all_a}
    plain_b = {k: k for k in all_b}
    report = {"applied": False, "a_prefix": "", "b_prefix": ""}
    if not enabled:
        return plain_a, plain_b, report
    same = len(set(a_keys) & set(b_keys))

    def meet(na: dict, nb: dict) -> int:
        return len({na[k] for k in a_keys} & {nb[k] for k in b_keys})

    ia, ib = inner_wrappers(a_keys), inner_wrappers(b_keys)
    if ia != ib:  # one side wrapped submodules (per-block torch.compile): compare without those parts
        da = {k: drop_inner_wrappers(k) for k in all_a}
        db = {k: drop_inner_wrappers(k) for k in all_b}
        if len({da[k] for k in a_keys}) == len(a_keys) and len({db[k] for k in b_keys}) == len(b_keys):
            a2, b2, rep = align_keys([da[k] for k in a_keys], [db[k] for k in b_keys], enabled,
                                     [da[k] for k in extra_a], [db[k] for k in extra_b])
            na = {k: a2[da[k]] for k in all_a}
            nb = {k: b2[db[k]] for k in all_b}
            if meet(na, nb) > same:
                dropped = "/".join(sorted(set(ia) | set(ib)))
                note = (f"aligned keys by dropping the inner wrapper component{'s' if len(set(ia) | set(ib)) > 1 else ''} "
                        f"{dropped}")
                if rep.get("applied"):
                    note += "; " + rep["note"].replace("aligned keys by ", "")
                rep = dict(rep, applied=True, inner=sorted(set(ia) | set(ib)), note=note)
                return na, nb, rep
    pa, pb = detect_prefix(a_keys), detect_prefix(b_keys)
    if pa == pb:
        return plain_a, plain_b, report
    # strip only the part of the prefix stacks that differs
    common = 0
    while common < min(len(pa), len(pb)) and pa[common] == pb[common]:
        common += 1
    common = pa[:common].rfind(".") + 1 if common else 0
    sa, sb = pa[common:], pb[common:]
    na = {k: pa[:common] + k[len(pa):] if k.startswith(pa) else k for k in all_a}
    nb = {k: pb[:common] + k[len(pb):] if k.startswith(pb) else k for k in all_b}
    if meet(na, nb) > same:
        report = {"applied": True, "a_prefix": sa, "b_prefix": sb,
                  "note": "aligned keys by stripping " + " and ".join(
                      f"{p!r} from {side}" for p, side in ((sa, "A"), (sb, "B")) if p)}
        return na, nb, report
    return plain_a, plain_b, report
