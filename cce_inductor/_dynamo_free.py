"""Keep the eager op from importing Dynamo and Inductor.

Calling ``cce_inductor.linear_cross_entropy`` outside ``torch.compile`` needs
nothing from the compiler stack, yet two things would import it (about 90
Dynamo modules and 140 MiB of resident memory):

* ``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` to set
  its marker, at import time of the module that uses it;
* every kernel registered through ``torch.library.custom_op`` is wrapped in
  ``torch._disable_dynamo``, which imports ``torch._dynamo`` on its first call
  in order to build the disabled version of the kernel.

Both are only needed when Dynamo is running, and Dynamo cannot be running
unless ``torch._dynamo`` was imported.  The two functions here defer the
import to that moment: until then the marker is set directly and the kernels
are called as they are; afterwards PyTorch's own code takes over unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])

# The attribute torch._dynamo.assume_constant_result sets and Dynamo reads
# when it meets a call to the function (torch 2.0 to 2.14).
_CONSTANT_MARKER = "_dynamo_marked_constant"
# Where torch._disable_dynamo caches the disabled version of a function.
_DISABLE_CACHE = "__dynamo_disable"


def assume_constant_result(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result`` without importing Dynamo.

    When Dynamo is already imported this is PyTorch's own decorator.
    Otherwise it sets the same marker, which Dynamo reads when it later
    traces a call to ``fn``.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    setattr(fn, _CONSTANT_MARKER, True)
    return fn


def call_kernels_without_importing_dynamo(*ops: Any) -> None:
    """Let the kernels of these ``torch.library.custom_op`` ops run before
    Dynamo is imported without importing it.

    ``torch._disable_dynamo`` builds the disabled kernel on the first call and
    caches it on the function.  This pre-fills that cache with a stand-in
    that calls the kernel directly while ``torch._dynamo`` is not imported (no
    Dynamo frame hook can be installed then, so disabling it changes
    nothing), and that removes itself once Dynamo is imported, so that
    PyTorch's wrapper builds and uses the real disabled kernel from then on.

    Call it after every kernel of the ops is registered.  Where the custom-op
    internals differ from what this expects it does nothing, and the first
    call imports Dynamo as before.
    """
    for op in ops:
        backend_fns = getattr(op, "_backend_fns", None)
        if not isinstance(backend_fns, dict):
            continue
        for wrapper in backend_fns.values():
            kernel = getattr(wrapper, "__wrapped__", None)
            if kernel is None or not hasattr(kernel, "__dict__"):
                continue
            if _DISABLE_CACHE not in vars(kernel):
                setattr(kernel, _DISABLE_CACHE, _StandIn(kernel, wrapper))


class _StandIn:
    """Calls ``kernel`` until Dynamo is imported, then hands back to ``wrapper``."""

    def __init__(self, kernel: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
        self.kernel, self.wrapper = kernel, wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return self.kernel(*args, **kwargs)
        if vars(self.kernel).get(_DISABLE_CACHE) is self:
            vars(self.kernel).pop(_DISABLE_CACHE, None)
        return self.wrapper(*args, **kwargs)
