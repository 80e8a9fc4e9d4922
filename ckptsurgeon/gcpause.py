"""Keeping Python's cyclic garbage collector out of the way of bulk object building.

Reading a checkpoint builds a few small objects per tensor (a TensorRef, its storage and byte
range, their tuples), none of them in a reference cycle. Every 700 new objects CPython runs a
young-generation collection, and every so often a full one that walks everything alive (with
torch imported: hundreds of thousands of objects). For a 50,000-tensor checkpoint (a mixture of
experts: one tensor per expert per projection) that was a quarter of the reading time here.
Pausing the collector while such a batch is built costs nothing: what it would have found is
collected at the next collection after it is switched back on.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused_gc():
    """Switch the cyclic collector off for the block; back on after it if it was on. Nests."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def freeze_heap() -> None:
    """Move every object alive now into the collector's permanent generation (``gc.freeze``):
    later collections walk only what is made after it. For a short-lived process (the CLI),
    once the modules and plugins are imported."""
    gc.freeze()
