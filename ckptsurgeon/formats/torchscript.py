"""The weights of TorchScript archives (``torch.jit.save``), read from the pickled module tree
inert: nothing imported, compiled or run."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping

from ..checkpoint import Checkpoint, Source
from ..errors import CorruptCheckpointError, NotACheckpointError, UnsafePickleError
from ..graph import detached, from_object, module_visit
from ..pickle_io import NotFastPath, load_refs
from ..pickle_scan import scan_globals
from ..inert import InertObject
from ..refs import TensorRef
from ..safety import unsafe_in
from ..zipfmt import TorchZip


def is_torchscript(records) -> bool:
    """Whether a torch zip's record names (below its folder) are a TorchScript archive's."""
    return "constants.pkl" in records or any(name.startswith("code/") for name in records)


_SCRIPT = "__torch__."  # the module TorchScript names its compiled classes under (no Python module)
# and the helpers its pickler wraps typed attribute values in (List[int] kernel sizes...): recorded
# inert like the classes; a module's parameters and buffers are never among those values
_SCRIPT_NAMES = (_SCRIPT, "torch.jit._pickle.")


def load_torchscript(z: TorchZip, path: str, key) -> Checkpoint:
    """A TorchScript archive (torch.jit.save; OpenAI's CLIP weights are one). Its data.pkl pickles
    the compiled module tree: each module an object of a ``__torch__.`` class whose recorded
    attributes hold its parameters, buffers and submodules. Read inert -- those classes are
    names only, nothing is imported, compiled or run -- that gives what ``torch.jit.load(path)
    .state_dict()`` returns. Outputs are plain state dicts: the TorchScript code is not carried."""
    data = z.read("data.pkl")
    named = list(dict.fromkeys(scan_globals(data)))  # (from the opcodes; torch is not imported)

    def refuse(why: str):
        """The error for an archive this reader stops on: unsafe when its pickle names a global of
        neither torch's allowlist nor TorchScript's (a file made to look like an archive)."""
        unsafe = unsafe_in(data)  # (imports torch for its allowlist: only on this path)
        foreign = [n for n in unsafe if not n.startswith(_SCRIPT_NAMES)]
        if foreign:
            return UnsafePickleError(
                f"{path} (a TorchScript archive) would import globals outside the weights-only allowlist: "
                f"{', '.join(foreign)}; nothing was executed", globals_=foreign,
                hint="torch.jit.save pickles only torch's own names and compiled classes: a file made to look like "
                     "a TorchScript archive; do not load it with torch.jit.load or torch.load either")
        return NotACheckpointError(
            f"{path} is a TorchScript archive (torch.jit.save) whose weights cannot be read without running it: {why}",
            hint="export them with torch.jit.load(path, map_location='cpu').state_dict() and torch.save, then run "
                 "ckpt-surgeon on that file")

    bound = [n for n in named if n.startswith(_SCRIPT) and not script_name(n)]
    if bound:  # TorchBind objects (quantized packed weights) keep their tensors in a form only torch rebuilds
        raise refuse(f"it uses {', '.join(bound[:5])}")
    if z.has("byteorder") and z.read("byteorder").strip() == b"big":
        raise refuse("its tensor data is big-endian")

    def source(k, dtype, nbytes):
        return z.source(f"data/{k}", nbytes, label=f"storage data/{k}")

    try:  # the compiled classes recorded inert; anything else outside the torch-free subset stops it
        root = load_refs(data, source, inert=[n for n in named if script_name(n)])
    except NotFastPath as e:
        raise refuse(f"it uses {e}") from None
    if _script_state(root) is None:
        raise refuse(f"its data.pkl holds {getattr(type(root), 'inert_name', type(root).__name__)}, not a scripted "
                     "module")
    sd = _script_state_dict(root, _script_declarations(z))
    if not sd:
        raise NotACheckpointError(
            f"{path} is a TorchScript archive whose module tree holds no parameters or buffers: a frozen module "
            "(torch.jit.freeze) keeps its weights as constants of the compiled code, and has no state dict",
            hint="save model.state_dict() before freezing")
    name = getattr(type(root), "inert_name", "module")
    source_ = Source(path=path, format="torch-zip", size=z.size, files=(path,), lazy=True, zip_prefix=z.prefix,
                     version=z.read("version") if z.has("version") else b"3\n", program="torchscript",
                     notes=(f"TorchScript archive (torch.jit.save): the parameters and buffers of its {name} read "
                            "from the pickled module tree, nothing compiled or run; outputs are plain state dicts "
                            "(the TorchScript code is not carried)",))
    return from_object(sd, source_, key=key)


def script_name(name: str) -> bool:
    """A global a TorchScript archive's pickle names that :func:`load_torchscript` records inert:
    a compiled class or a typed-value helper, not a TorchBind class (quantized packed weights)."""
    return name.startswith(_SCRIPT_NAMES) and not name.startswith(_SCRIPT + "torch.classes.")


def _script_state(v) -> Mapping | None:
    """The attributes (BUILD state) of an object of a TorchScript class read inert, else None."""
    if isinstance(v, InertObject) and getattr(type(v), "inert_module", "").startswith("__torch__"):
        state = v._inert["state"]
        return state if isinstance(state, Mapping) else None
    return None


def _is_script_module(v) -> bool:
    """A TorchScript module read inert: its attributes include ``training``, as every scripted or
    traced module's do (a scripted class's instance held as an attribute is not a module)."""
    state = _script_state(v)
    return state is not None and "training" in state


_SCRIPT_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t]+.*\n?|\n)*)", re.M)
_DECLARED = re.compile(r"^  (__parameters__|__buffers__) = (\[[^\]\n]*\])[ \t]*$", re.M)


def _script_declarations(z: TorchZip) -> dict:
    """{class qualname: names of its parameters then its buffers}, read from the ``__parameters__``
    and ``__buffers__`` lists each compiled module class declares in the archive's ``code/``
    (text, parsed as literals: nothing compiled or run). A plain tensor attribute (``self.x =
    torch.ones(2)``) is in neither list and, as in torch.jit.load's state_dict(), not a weight."""
    import ast

    out = {}
    for record in z.infos:
        if not (record.startswith("code/") and record.endswith(".py")) or z.infos[record].file_size > 64 << 20:
            continue  # (a class of a file too large to be code: its tensors taken in attribute order)
        module = record[len("code/"):-len(".py")].replace("/", ".")
        try:
            text = z.read(record).decode("utf-8", "replace")
        except CorruptCheckpointError:
            continue  # (then that class's tensors are taken in attribute order, as without code)
        for cls in _SCRIPT_CLASS.finditer(text):
            lists = {}
            for kind, literal in _DECLARED.findall(cls.group(2)):
                try:
                    value = ast.literal_eval(literal)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    lists[kind] = value
            if len(lists) == 2:
                out[f"{module}.{cls.group(1)}"] = lists["__parameters__"] + lists["__buffers__"]
    return out


def _script_state_dict(module, declared: dict, prefix: str = "", out=None, visits=None,
                       above=()) -> "OrderedDict[str, Any]":
    """``state_dict()`` of a TorchScript module from its recorded attributes: its parameters, then
    its buffers (as its class declares them, see :func:`_script_declarations`; without a
    declaration every tensor attribute, in attribute order), then its submodules', depth first."""
    out = OrderedDict() if out is None else out
    visits = module_visit(visits, "scripted")
    state = module._inert["state"]
    names = declared.get(f"{type(module).inert_module}.{type(module).inert_name}")
    for name in (names if names is not None else state):
        v = state.get(name)
        if isinstance(v, TensorRef):
            out[prefix + str(name)] = detached(v)
    above = above + (id(module),)
    for name, v in state.items():
        if _is_script_module(v):
            if id(v) in above:  # a module tree is a tree: torch.jit.save cannot write this
                raise CorruptCheckpointError(f"the scripted module {prefix}{name} contains itself")
            _script_state_dict(v, declared, f"{prefix}{name}.", out, visits, above)
    return out
