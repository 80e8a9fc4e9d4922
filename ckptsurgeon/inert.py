"""Inert stand-ins for what a pickle names without ckpt-surgeon importing or calling it:
``GlobalRef``/``CallRef`` keep an allowlisted torch global and a call of one exactly as the pickle
named them (so the graph pickles back byte-compatibly), ``InertObject``/``InertCall`` record
objects of, and calls to, globals outside every allowlist (``--inert-pickle``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GlobalRef:
    """A global a pickle named (``module.name``), kept as a name: never imported here."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __call__(self, *args):
        return CallRef(self, args)

    def resolve(self):
        """The real object (imports its module: only for allowlisted torch globals)."""
        import importlib

        obj = importlib.import_module(self.module)
        for part in self.name.split("."):
            obj = getattr(obj, part)
        return obj


class CallRef:
    """``func(*args)`` recorded by the unpickler instead of executed (plus BUILD state)."""

    __slots__ = ("func", "args", "state")

    def __init__(self, func: GlobalRef, args: tuple, state: Any = None):
        self.func, self.args, self.state = func, args, state

    def __setstate__(self, state):  # BUILD on a recorded call: remember it
        self.state = state

    def __repr__(self):
        return f"{self.func.qualname}(...)"


class InertObject:
    """An object of a global outside every allowlist, recorded instead of built (``--inert-pickle``).

    Each such global becomes a subclass made by :func:`inert_class` -- never imported, never
    run. Instances remember how the pickle made them (NEWOBJ or a call, arguments, BUILD state,
    appended items, set items) so the writer can emit the same opcodes again: the object is
    carried through a surgery exactly as it was, as (un)safe to ``torch.load`` as before.
    """

    inert_module = ""
    inert_name = ""

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls cls.__new__(cls, *args) only
        self = object.__new__(cls)
        object.__setattr__(self, "_inert", {"args": args, "kwargs": kwargs, "newobj": True, "state": None,
                                           "items": [], "dictitems": []})
        return self

    def __init__(self, *args, **kwargs):  # a call (REDUCE: cls(*args)) runs __init__ after __new__
        self._inert["newobj"] = False

    def __setstate__(self, state):  # BUILD
        self._inert["state"] = state

    def append(self, item):  # APPEND(S) on something that is not a list
        self._inert["items"].append(item)

    def extend(self, items):
        self._inert["items"].extend(items)

    def __setitem__(self, key, value):  # SETITEM(S) on something that is not a dict
        self._inert["dictitems"].append((key, value))

    def __call__(self, *args):  # REDUCE with an inert object as the function
        return InertCall(self, args)

    def __reduce_ex__(self, protocol):
        from .errors import UnsupportedError

        raise UnsupportedError(f"{self.inert_module}.{self.inert_name} was read inert (--inert-pickle) and can "
                               "only be written back by ckpt-surgeon's own torch writer")

    def __repr__(self):
        return f"<inert {self.inert_module}.{self.inert_name}>"


class InertCall:
    """``inert_object(*args)`` recorded (REDUCE whose function is an inert instance)."""

    __slots__ = ("func", "args", "state")

    def __init__(self, func, args):
        self.func, self.args, self.state = func, args, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert call of {self.func!r}>"


_INERT_CLASSES: dict[tuple[str, str], type] = {}


def inert_class(module: str, name: str) -> type:
    """The stand-in class for the global ``module.name`` (nothing is imported). One per name and
    process, so that objects read from two files compare equal when their records do."""
    key = (str(module), str(name))
    cls = _INERT_CLASSES.get(key)
    if cls is None:
        cls = _INERT_CLASSES[key] = type(key[1], (InertObject,), {
            "inert_module": key[0], "inert_name": key[1], "__qualname__": f"{key[0]}.{key[1]}", "__slots__": ()})
    return cls
