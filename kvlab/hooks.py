"""Context-managed forward hooks: capture and patch module inputs and outputs.

Every hook registered here is removed when the ``with`` block ends, also when it ends
with an exception, so a failed cell never leaves a model silently modified::

    with capture(model, {"m3": arch.value_module(3)}, what="input") as store:
        model(**batch)
    store["m3"]            # (batch, seq, d_ff)

Module outputs can be tensors or tuples (transformer blocks return tuples in some
families); :func:`first` and :func:`replace_first` handle both.
"""
from __future__ import annotations

from contextlib import contextmanager, ExitStack
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

Tensor = torch.Tensor


def first(x) -> Tensor:
    """The main tensor of a module input/output (the first element of a tuple)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def replace_first(x, new: Tensor):
    """Return ``x`` with its main tensor replaced by ``new`` (keeps tuple structure)."""
    if isinstance(x, tuple):
        return (new, *x[1:])
    if isinstance(x, list):
        return [new, *x[1:]]
    return new


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens.

    Register inside the block (``with hooks(handles): handles.append(...)``) so that hooks
    registered before a failing registration are removed too.
    """
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _check_what(what: str) -> None:
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")


def _check_mapping(modules, where: str) -> None:
    if not isinstance(modules, Mapping):
        raise ValueError(f"{where}: expected a mapping of modules, got {type(modules).__name__}")


@contextmanager
def capture(model: nn.Module, modules: Mapping[str, nn.Module], what: str = "output",
            detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record the main input or output tensor of each named module during the block.

    Returns a dict filled by the forward passes run inside the ``with`` block (the last
    pass wins). ``detach=False`` keeps the autograd graph (for gradient methods).
    """
    _check_what(what)
    _check_mapping(modules, "capture")
    for key, mod in modules.items():        # check everything before registering anything
        if not isinstance(mod, nn.Module):
            raise ValueError(f"capture: {key!r} maps to a {type(mod).__name__}, not an nn.Module")
    store: dict[str, Tensor] = {}
    handles = []
    with hooks(handles):
        for key, mod in modules.items():
            def hook(module, args, output, key=key):
                t = first(args) if what == "input" else first(output)
                store[key] = t.detach() if detach else t
            handles.append(mod.register_forward_hook(hook))
        yield store


PatchFn = Callable[[Tensor], Tensor]


@contextmanager
def patch(modules: Mapping[nn.Module, PatchFn] | nn.Module, fn: PatchFn | None = None,
          what: str = "output") -> Iterator[None]:
    """Replace the main input or output of modules by ``fn(tensor)`` during the block.

    ``patch(module, fn)`` or ``patch({module: fn, ...})``. ``fn`` receives the tensor and
    returns the replacement (same shape); it may modify a clone, never the original.
    """
    if isinstance(modules, nn.Module):
        if fn is None:
            raise ValueError("patch(module, fn): fn is required")
        modules = {modules: fn}
    _check_what(what)
    _check_mapping(modules, "patch")
    for mod, f in modules.items():          # check everything before registering anything
        if not isinstance(mod, nn.Module):
            raise ValueError(f"patch: {mod!r} is not an nn.Module")
        if not callable(f):
            raise ValueError(f"patch: the function for {type(mod).__name__} is not callable: {f!r}")
    handles = []
    with hooks(handles):
        for mod, f in modules.items():
            if what == "output":
                def hook(module, args, output, f=f):
                    return replace_first(output, f(first(output)))
                handles.append(mod.register_forward_hook(hook))
            else:
                def pre_hook(module, args, f=f):
                    return replace_first(tuple(args), f(first(args)))
                handles.append(mod.register_forward_pre_hook(pre_hook))
        yield


@contextmanager
def many(*contexts) -> Iterator[list]:
    """Enter several context managers at once (all exited, in reverse, on error)."""
    with ExitStack() as stack:
        yield [stack.enter_context(c) for c in contexts]
