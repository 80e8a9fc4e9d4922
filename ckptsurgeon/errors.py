"""The one error hierarchy of ckpt-surgeon.

Every user-facing failure is a :class:`CkptSurgeonError`; the CLI prints its message on one
line and exits with :data:`EXIT_ERROR` (2), like diff(1). Exit code 1 is reserved for a
*negative finding* (diff found differences, verify found divergence, scan found unsafe globals).
Messages say what is wrong and, where there is one, what to do about it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_ERROR = 2


class NotFastPath(Exception):
    """Not a user error: a pickle uses something outside the torch-free subset that
    :mod:`ckptsurgeon.pickle_io` reads, so the reader hands the file to ``torch.load`` instead."""


class CkptSurgeonError(Exception):
    """Base class: a problem the user can understand and fix."""

    exit_code = EXIT_ERROR
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class InputNotFoundError(CkptSurgeonError):
    """A path that should exist does not, or cannot be read."""

    kind = "not-found"


class NotACheckpointError(CkptSurgeonError):
    """The file is readable but is no checkpoint format we know."""

    kind = "not-a-checkpoint"


class CorruptCheckpointError(CkptSurgeonError):
    """The file claims a known format but is truncated, inconsistent or damaged."""

    kind = "corrupt"


class UnsafePickleError(CkptSurgeonError):
    """Loading would import globals outside the allowlist; nothing was executed."""

    kind = "unsafe-pickle"

    def __init__(self, message: str, *, globals_: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.globals = list(globals_ or [])


class AmbiguousStateDictError(CkptSurgeonError):
    """Several state-dict candidates exist and none is clearly the model's."""

    kind = "ambiguous"

    def __init__(self, message: str, *, candidates: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.candidates = list(candidates or [])
        #: for several model state dicts side by side: how --key '<bare>' takes them as one ("" if it cannot)
        self.together = ""
        #: the whole file read, without a state dict chosen (``state`` empty, ``wrapper`` the
        #: top-level object): what ``inspect`` shows instead of failing
        self.overview = None


class SelectionError(CkptSurgeonError):
    """A pattern, key or layer selection matched nothing or was malformed."""

    kind = "selection"


class NoStateDictError(SelectionError):
    """The file holds no mapping of names to tensors (an RNG state, a bare optimizer step...)."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, hint=hint)
        #: the whole file read (``state`` empty): what ``inspect`` shows instead of failing
        self.overview = None


class KeyCollisionError(CkptSurgeonError):
    """A rename would map two keys onto one name."""

    kind = "collision"

    def __init__(self, message: str, *, collisions: dict | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.collisions = dict(collisions or {})


class MemoryLimitError(CkptSurgeonError):
    """The work needs more memory than there is (a tensor far larger dense than in its file)."""

    kind = "memory"


class OutputError(CkptSurgeonError):
    """The output cannot be written (refused overwrite, missing directory, disk full...)."""

    kind = "output"


class UnsupportedError(CkptSurgeonError):
    """The input is valid but uses something this tool cannot handle (yet)."""

    kind = "unsupported"


class ModelError(CkptSurgeonError):
    """A model factory could not be imported, called, or loaded with the weights."""

    kind = "model"


class PluginError(CkptSurgeonError):
    """A plugin is broken or two plugins conflict."""

    kind = "plugin"


#: the installed distributions commands import late (their import names are theirs too)
DEPENDENCIES = frozenset({"torch", "safetensors", "deepdiff", "numpy", "click", "pluggy", "rich", "xxhash", "isal"})


def missing_dependency(e: BaseException | None) -> str | None:
    """The dependency that ``e`` (or an exception it was raised from) says is not installed:
    torch is imported only by the commands that compute, so an install without it fails late,
    in the middle of a command, not at start-up."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in DEPENDENCIES:
            return e.name.split(".")[0]
        e = e.__cause__ or e.__context__
    return None
