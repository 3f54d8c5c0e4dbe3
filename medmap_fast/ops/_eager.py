"""The ops' torch.library custom ops, called without torch.library's per-call cost in eager mode.

Every op is registered with ``torch.library`` so that torch.compile, FakeTensor and opcheck see it.
A call through it goes C++ dispatcher -> torch.library's autograd wrapper (which refills default
arguments and flattens list arguments with pytree, forward and backward) -> redispatch -> the
Python implementation: measured on the 2-core CPU, about 36 µs more than the implementation alone
for a forward call, and norm_act forward + backward on a tiny input took 520 µs through it against
324 µs this way. At the deep levels of a U-Net (8³-16³) that is as long as the kernels themselves.

``call(op, *args)`` runs the same implementation, setup_context and backward functions (recorded by
:func:`custom_op` and :func:`register_autograd`, drop-in for torch.library's) through one light
``torch.autograd.Function`` (or directly when nothing needs a gradient), but only in plain eager
mode: while compiling or tracing, under a dispatch or torch-function mode, under functorch
transforms, or with tensor subclasses (FakeTensor, FunctionalTensor, ...) it calls the custom op, so
graphs and modes see the op exactly as before. Results, gradients, errors and the saved tensors are
the same on both paths; only the dispatch around the implementation differs.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _Entry:
    __slots__ = ("impl", "setup", "backward")

    def __init__(self, impl: Callable):
        self.impl = impl
        self.setup: Optional[Callable] = None
        self.backward: Optional[Callable] = None


_BY_OP: Dict[object, _Entry] = {}
_BY_NAME: Dict[str, _Entry] = {}


def custom_op(name: str, **kwargs):
    """``torch.library.custom_op(name, **kwargs)`` that also remembers the implementation for :func:`call`."""

    def deco(fn):
        op = torch.library.custom_op(name, **kwargs)(fn)
        entry = _Entry(fn)
        _BY_OP[op] = entry
        _BY_NAME[name] = entry
        return op

    return deco


def register_autograd(name: str, backward: Callable, *, setup_context: Callable) -> None:
    """``torch.library.register_autograd``, also remembered for :func:`call`."""
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    entry = _BY_NAME[name]
    entry.setup, entry.backward = setup_context, backward


def _direct_ok(args) -> bool:
    """Plain eager mode on plain tensors: the only case where the custom op may be bypassed."""
    if torch.compiler.is_compiling():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    for a in args:
        if isinstance(a, (list, tuple)):
            if any(type(t) not in _PLAIN for t in a):
                return False
        elif isinstance(a, torch.Tensor) and type(a) not in _PLAIN:
            return False
    return True


def call(op, *args):
    """``op(*args)``, op being a custom op made by :func:`custom_op` (positional arguments, all given)."""
    entry = _BY_OP[op]
    if not _direct_ok(args):
        return op(*args)
    if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        # what torch.library does too when no input requires grad: the implementation alone
        return entry.impl(*args)
    if entry.backward is None:
        return op(*args)  # no autograd formula: torch.library's own handling (e.g. double backward)
    sizes = tuple(len(a) if isinstance(a, list) else -1 for a in args)
    flat = []
    for a, n in zip(args, sizes):
        if n < 0:
            flat.append(a)
        else:
            flat.extend(a)
    out = _Direct.apply(_Call(entry, sizes), *flat)
    return list(out) if isinstance(out, tuple) else out


class _Call:
    """Per-call state: which op, how its list arguments were flattened, whether it returned a list."""

    __slots__ = ("entry", "sizes", "returns_list")

    def __init__(self, entry: _Entry, sizes: tuple):
        self.entry, self.sizes, self.returns_list = entry, sizes, False

    def unflatten(self, flat) -> tuple:
        out, i = [], 0
        for n in self.sizes:
            if n < 0:
                out.append(flat[i])
                i += 1
            else:
                out.append(list(flat[i:i + n]))
                i += n
        return tuple(out)

    def flatten_grads(self, grads) -> list:
        flat = []
        for g, n in zip(grads, self.sizes):
            if n < 0:
                flat.append(g)
            else:
                flat.extend(g if g is not None else [None] * n)
        return flat


class _Direct(torch.autograd.Function):
    """The custom op's implementation with its registered setup_context and backward, as
    torch.library's wrapper runs them: ``needs_input_grad`` in the list arguments' structure."""

    @staticmethod
    def forward(ctx, c: _Call, *flat):
        args = c.unflatten(flat)
        out = c.entry.impl(*args)
        c.entry.setup(ctx, args, out)
        ctx.medmap_call = c
        if isinstance(out, (list, tuple)):
            c.returns_list = True
            return tuple(out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        c = ctx.medmap_call
        flat_needs = ctx.needs_input_grad
        ctx.needs_input_grad = c.unflatten(flat_needs[1:])
        try:
            res = c.entry.backward(ctx, list(grads) if c.returns_list else grads[0])
        finally:
            ctx.needs_input_grad = flat_needs
        if not isinstance(res, tuple):
            res = (res,)
        return (None, *c.flatten_grads(res))
