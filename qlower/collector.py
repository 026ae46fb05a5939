"""Python's cycle collector, paused while a model is compiled or verified.

A 100k-node graph is millions of long-lived Python objects (onnx-graphsurgeon nodes and
tensors, which point at each other). The cycle collector's full collections rescan all
of them every time enough new objects have been made, so building such a graph costs
time that grows faster than its size: half of a 100k-node conversion's CPU time was in
collection (issue 9). Nothing made during a conversion needs collecting before it ends;
the collector resumes, in its previous state, when the call returns.
"""

from __future__ import annotations

import functools
import gc
from typing import Callable, TypeVar

Result = TypeVar("Result")


def paused_cycle_collection(function: Callable[..., Result]) -> Callable[..., Result]:
    """Run ``function`` with the cycle collector disabled (reference counting still frees)."""

    @functools.wraps(function)
    def run(*args: object, **kwargs: object) -> Result:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return run
