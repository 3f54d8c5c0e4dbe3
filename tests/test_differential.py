"""Property-based differential test of every op against the float64 reference.

Each case draws, from its own seed, one op and everything about the call: batch 1-3, odd sizes
including 1, a layout for every input tensor and, independently, for grad_output (contiguous,
channels innermost or outermost, permuted, a channel slice, strided, expanded, size-1 dims with
arbitrary strides), every norm / activation / residual placement / fusion mode / anchor / target /
reduction, masks with none, one or all modalities present (and their dtype and layout), the dtype,
which inputs require grad, and the same tensor passed twice. Then it checks:

1. the op's value and every gradient against the reference run in float64 on contiguous copies of
   the same values (low precision: at most ``LOWP_RATIO`` times the error of the reference run in
   that precision, plus a floor);
2. that the float64 reference, run on the drawn layouts, agrees with itself on contiguous copies:
   it is the oracle, and torch kernels have had layout bugs (``F.instance_norm``'s backward with
   batch 1 and a channels-last gradient, see ``reference._DenseGradient``);
3. that two runs of the op are bitwise equal.

A fresh base seed every run, printed at the start; every failure message says how to replay it.

    MEDMAP_FAST_FUZZ_CASES=5000 python -m pytest tests/test_differential.py     # a longer run
    MEDMAP_FAST_FUZZ_SEED=1234 python -m pytest tests/test_differential.py -k case_17   # a replay
"""

from __future__ import annotations

import inspect
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch

import medmap_fast
from medmap_fast import reference
from medmap_fast.ops import _backends

from conftest import FUZZ_SEED, LOWP_FLOOR, LOWP_RATIO

CASES = int(os.environ.get("MEDMAP_FAST_FUZZ_CASES", "500"))
BASE_SEED = FUZZ_SEED

HALF = (torch.float16, torch.bfloat16)
# Normwise tolerances: max |error| <= rtol * max |exact| + atol, times the case's conditioning gain.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# fp32 arithmetic (also what the ops do for half inputs) leaves ~1e-6 where exact terms cancel to 0
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

LAYOUTS = ["contiguous", "channels_last", "channels_first", "permuted", "channel_slice", "strided", "expanded",
           "size1_strides"]
# grad_output: channels-last (what a channels-last network hands back) twice as often as the others
GRAD_LAYOUTS = LAYOUTS + ["channels_last"]


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


class Draw:
    """Every random choice of a case, from its seed; ``notes`` says what was drawn."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.notes: Dict[str, object] = {}

    def choice(self, name: Optional[str], options):
        value = self.rng.choice(list(options))
        if name:
            self.notes[name] = value
        return value

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64)


@dataclass
class Arg:
    """One tensor argument: float64 values (``master``, already rounded to ``dtype``) that the op sees
    through a layout transform. Gradients are taken with respect to the master, so every layout's
    backward path (expand's sum included) is part of what is compared."""

    master: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    layout: str
    cdim: Optional[int]
    requires_grad: bool
    leaf: Optional[torch.Tensor] = field(default=None, repr=False)

    def fresh_leaf(self, device) -> torch.Tensor:
        self.leaf = self.master.detach().to(device).requires_grad_(self.requires_grad)
        return self.leaf


def make_arg(d: Draw, name: str, values: torch.Tensor, dtype, cdim, grad_p=0.75, layouts=LAYOUTS) -> Arg:
    """An argument holding ``values`` (float64, its final shape) in a drawn layout."""
    shape = tuple(values.shape)
    requires_grad = d.chance(grad_p)
    d.notes[f"{name}.grad"] = requires_grad
    if requires_grad and dtype in HALF:
        # An expanded input's gradient sums many equal elements, each rounded alike to half precision:
        # a coherent error the per-element low-precision bound does not describe.
        layouts = [x for x in layouts if x != "expanded"]
    layout = d.choice(f"{name}.layout", layouts) if values.dim() > 0 else "contiguous"
    master = values.to(dtype).double()
    if layout == "expanded":
        dims = [i for i, s in enumerate(shape) if s > 1]
        if dims:
            keep = d.rng.sample(dims, d.rng.randint(1, len(dims)))
            master = master[tuple(slice(0, 1) if i in keep else slice(None) for i in range(len(shape)))].clone()
        else:
            layout = "contiguous"
    return Arg(master, shape, dtype, layout, cdim, requires_grad)


def lay(t: torch.Tensor, layout: str, shape: tuple, cdim: Optional[int], rng: random.Random) -> torch.Tensor:
    """``t`` (differentiable) as a tensor of ``shape`` in ``layout``; same values in any layout."""
    n = len(shape)
    t = t.expand(shape)
    if n == 0 or layout in ("contiguous", "expanded"):
        return t.contiguous() if layout == "contiguous" else t
    c = (cdim % n) if cdim is not None else n - 1
    if layout == "channels_last":  # the channel dim innermost in memory
        return t.movedim(c, -1).contiguous().movedim(-1, c)
    if layout == "channels_first":  # the channel dim outermost in memory
        return t.movedim(c, 0).contiguous().movedim(0, c)
    if layout == "permuted":  # batch (and channel) dims outermost, the other dims in reverse memory order
        head = [0] if c == 0 or n <= 2 else [0, c]
        order = head + [i for i in range(n - 1, -1, -1) if i not in head] if n > 2 else list(range(n - 1, -1, -1))
        inv = [order.index(i) for i in range(n)]
        return t.permute(order).contiguous().permute(inv)
    if layout == "channel_slice":  # a slice of a tensor with more channels: strided outer dims
        wide = torch.cat([t.new_zeros(tuple(s if i != c else 2 for i, s in enumerate(shape))), t,
                          t.new_zeros(tuple(s if i != c else 1 for i, s in enumerate(shape)))], dim=c)
        return wide.narrow(c, 2, shape[c])
    if layout == "strided":  # every other element along the last dim
        return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
    if layout == "size1_strides":  # size-1 dims with strides a view may give them (any value is valid)
        base = t.contiguous() if rng.random() < 0.5 else t.movedim(c, -1).contiguous().movedim(-1, c)
        strides = [rng.choice([0, 1, 3, base.stride(i) * 7 + 1]) if s == 1 else base.stride(i)
                   for i, s in enumerate(shape)]
        return base.as_strided(shape, strides)
    raise ValueError(layout)


def materialise(arg: Arg, device, rng: random.Random, dtype=None, layout=None) -> torch.Tensor:
    """The op's view of ``arg``: from its leaf, cast to ``dtype`` (the arg's own by default), in
    ``layout`` (the drawn one by default; "contiguous" gives the oracle's copy)."""
    t = arg.leaf.to(dtype or arg.dtype)
    return lay(t, layout or arg.layout, arg.shape, arg.cdim, rng)


def spread(d: Draw, groups: int, n: int) -> torch.Tensor:
    """(groups, n) values whose every row has a variance of about 1/3: a shuffled grid in [-1, 1]
    with jitter, so that no normalised group is ill-conditioned by chance."""
    grid = torch.linspace(-1.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    perm = torch.argsort(d.rand(groups, n), dim=1)
    return grid[perm] + 0.05 * d.randn(groups, n)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A drawn call: ``bind(inputs)`` turns the materialised arguments (by name) into the positional
    and keyword arguments that ``op`` (with a ``backend``) and ``ref`` (the reference) both take."""

    op: str
    args: Dict[str, Arg]
    bind: Callable
    op_fn: Callable
    ref_fn: Callable
    dtype: torch.dtype
    out_layouts: List[str] = field(default_factory=lambda: list(GRAD_LAYOUTS))
    gain: float = 1.0  # tolerance factor for an ill-conditioned case (see _conditioning)
    triton_ok: bool = True
    num_modalities: int = 1

    def call(self, backend, inputs):
        a, k = self.bind(inputs)
        return self.op_fn(*a, backend=backend, **k)

    def oracle(self, inputs):
        a, k = self.bind(inputs)
        return self.ref_fn(*a, **k)


def _device(inputs) -> torch.device:
    return next(iter(inputs.values())).device


def _batch(d: Draw) -> int:
    # batch 1 half the time: a size-1 dim leaves its stride free, the classic source of layout bugs
    return d.choice("B", [1, 1, 2, 3])


def _dtype(d: Draw) -> torch.dtype:
    return d.choice("dtype", [torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16])


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spatial(d: Draw, ndim=3, sizes=(1, 2, 3, 5)):
    return tuple(d.rng.choice(sizes) for _ in range(ndim))


def _mask_values(d: Draw, B: int, M: int) -> torch.Tensor:
    kind = d.choice("mask", ["none", "one", "all", "random", "random"])
    if kind == "none":
        m = torch.zeros(B, M, dtype=torch.bool)
    elif kind == "all":
        m = torch.ones(B, M, dtype=torch.bool)
    elif kind == "one":
        m = torch.nn.functional.one_hot(torch.tensor([d.rng.randrange(M) for _ in range(B)]), M).bool()
    else:
        m = d.rand(B, M) < 0.5
        if B > 1:
            m[d.rng.randrange(B)] = d.chance(0.5)  # one sample with nothing or everything present
    return m


def _mask(d: Draw, B: int, M: int):
    """(B, M) mask values (bool) and a function giving them in a drawn dtype and layout (masks take no
    gradient)."""
    m = _mask_values(d, B, M)
    return m, _mask_as(d, m)


def _mask_as(d: Draw, m: torch.Tensor):
    B, M = m.shape
    mdtype = d.choice("mask.dtype", [torch.bool, torch.int64, torch.float32])
    mlayout = d.choice("mask.layout", ["contiguous", "transposed", "expanded"])
    if mlayout == "expanded" and not (m == m[:1]).all():
        mlayout = "contiguous"
    if mlayout == "expanded":
        return lambda device: m[:1].to(device, mdtype).expand(B, M)
    if mlayout == "transposed":
        return lambda device: m.t().contiguous().t().to(device, mdtype)
    return lambda device: m.to(device, mdtype)


def _features(d: Draw, B: int, M: int, C: int, spatial, dtype, scale=1.0, offset=0.0):
    """Per-modality features: a stacked (B, M, C, *spatial) argument, or a list of M (B, C, *spatial)
    ones with their own layouts, where one modality may be the very same tensor as another."""
    stacked = d.choice("stacked", [False, False, True])
    if stacked:
        vals = offset + scale * d.randn(B, M, C, *spatial)
        return stacked, {"f": make_arg(d, "f", vals, dtype, 2)}, []
    args = {f"f{k}": make_arg(d, f"f{k}", offset + scale * d.randn(B, C, *spatial), dtype, 1) for k in range(M)}
    order = [f"f{k}" for k in range(M)]
    if M > 1 and d.chance(0.25):  # the same tensor object passed for two modalities
        j, k = d.rng.sample(range(M), 2)
        order[k] = order[j]
        del args[f"f{k}"]
        d.notes["same_tensor"] = (j, k)
    return stacked, args, order


def _poison_missing(d: Draw, args: Dict[str, Arg], stacked: bool, order: List[str], present: torch.Tensor,
                    weights: Optional[str] = None):
    """NaN into the features (and with ``weights``, the fusion weights) of missing modalities, some of
    the time: they must never reach a result or a gradient. Only where every element of the master
    is one element the op sees (not expanded, not one tensor standing for two modalities)."""
    if not d.chance(0.3) or (not stacked and len(set(order)) < len(order)):
        d.notes["poisoned"] = False
        return
    d.notes["poisoned"] = True
    missing = ~present
    with torch.no_grad():
        if stacked:
            if args["f"].layout != "expanded":
                args["f"].master[missing] = float("nan")
        else:
            for k, name in enumerate(order):
                if args[name].layout != "expanded":
                    args[name].master[missing[:, k]] = float("nan")
        w = args.get(weights) if weights else None
        if w is not None and w.layout != "expanded":
            w.master[missing] = float("nan")


def _feature_input(stacked, order, inputs):
    return inputs["f"] if stacked else [inputs[name] for name in order]


def _conditioning(x: torch.Tensor, groups: int, eps: float) -> float:
    """max over the norm's groups of max |x| / sqrt(var + eps): how much a rounding of x or of the
    group mean is amplified in the normalised values (about 5 for the spread draws, 1/sqrt(eps) times max abs x for a
    group whose values are all equal, e.g. an expanded one or a single voxel)."""
    v = x.reshape(x.shape[0], groups, -1)
    var = v.var(dim=-1, unbiased=False)
    return (v.abs().amax(dim=-1) / (var + eps).sqrt()).max().item()


def draw_norm_act(d: Draw) -> Case:
    dtype = _dtype(d)
    pdtype = dtype if dtype not in HALF else d.choice("param_dtype", [dtype, torch.float32])
    B = _batch(d)
    norm = d.choice("norm", ["instance", "group"])
    C = d.rng.choice([1, 2, 3, 4, 6, 7]) if norm == "instance" else d.rng.choice([1, 2, 4, 6, 9])
    G = C if norm == "instance" else d.choice("groups", [g for g in range(1, C + 1) if C % g == 0])
    spatial = _spatial(d)
    S = math.prod(spatial)
    activation = d.choice("activation", ["leaky_relu", "relu", "identity", None])
    slope = d.choice("slope", [0.01, 0.2, -0.5]) if activation == "leaky_relu" else 0.01
    position = d.choice("residual", [None, "before_activation", "after_activation"])
    eps = d.choice("eps", [1e-5, 1e-3])
    affine = d.chance(0.7)
    lowp = dtype in HALF
    offset, scale = (d.rng.choice([0.0, 2.0]), 3.0) if lowp else (d.rng.choice([0.0, 100.0]), 50.0)
    shape = (B, C, *spatial)
    # x: every group (b, g) holds cg * S well-spread values (an expanded layout may repeat some)
    args = {"x": make_arg(d, "x", offset + scale * spread(d, B * G, (C // G) * S).reshape(shape), dtype, 1)}
    same = position is not None and d.chance(0.2)  # residual=x: one tensor in both places
    d.notes["same_tensor"] = "residual=x" if same else None
    if position is not None and not same:
        args["residual"] = make_arg(d, "residual", d.randn(*shape), dtype, 1)
    params = ["contiguous", "expanded", "strided"]
    if affine:
        args["weight"] = make_arg(d, "weight", 1.0 + 0.5 * d.randn(C), pdtype, 0, layouts=params)
    seen = {k: a.master.expand(a.shape) for k, a in args.items()}  # the values the op will see
    kappa = _conditioning(seen["x"], G, eps)
    gain = max(1.0, kappa / 2)
    # Keep the activation's input clear of its kink, where a rounding may flip the slope: the bias is
    # drawn until every pre-activation value is (or the case drops the kink).
    kink = activation in ("leaky_relu", "relu")
    if kink:
        z0 = reference.norm_act(seen["x"], seen.get("weight"), None, norm, G if norm == "group" else None,
                                "identity", eps=eps)
        if position == "before_activation":
            z0 = z0 + seen["x" if same else "residual"]
        margin = (0.05 if lowp else 1e-4) * gain
    for _ in range(50 if affine else 1):
        bias = make_arg(d, "bias", 0.3 * d.randn(C), pdtype, 0, layouts=params) if affine else None
        if not kink:
            break
        b = bias.master.expand(C).view(1, C, *[1] * len(spatial)) if affine else 0.0
        if (z0 + b).abs().min() > margin:
            break
    else:
        activation = "identity"
        d.notes["activation"] = "identity (no draw clear of the kink)"
    if affine:
        args["bias"] = bias
    kw = dict(norm=norm, num_groups=G if norm == "group" else None, activation=activation, negative_slope=slope,
              eps=eps)
    if position is not None:
        kw["residual_position"] = position

    def bind(inputs):
        res = inputs["x"] if same else inputs.get("residual")
        return (inputs["x"], inputs.get("weight"), inputs.get("bias")), dict(kw, residual=res)

    d.notes["conditioning"] = round(kappa, 1)
    return Case("norm_act", args, bind, medmap_fast.norm_act, reference.norm_act, dtype, gain=gain,
                triton_ok=B * C * S <= 120 and dtype != torch.bfloat16)


def draw_masked_fusion(d: Draw) -> Case:
    dtype = _dtype(d)
    B, M, C = _batch(d), d.rng.randint(1, 5), d.rng.choice([1, 2, 3, 5])
    spatial = _spatial(d)
    mode = d.choice("mode", ["mean", "weighted", "zero_concat", "anchor_impute"])
    stacked, args, order = _features(d, B, M, C, spatial, dtype)
    present, mask = _mask(d, B, M)
    normalize = False
    if mode == "weighted":
        normalize = d.choice("normalize", [False, True])
        wshape = d.choice("weights.shape", ["BM", "BMC"])
        vals = d.randn(B, M) if wshape == "BM" else d.randn(B, M, C)
        args["weights"] = make_arg(d, "weights", vals, _acc(dtype), None,
                                   layouts=["contiguous", "permuted", "expanded", "size1_strides"])
    elif mode == "anchor_impute":
        pi = d.choice("pi", [None, "M", "BM"])
        if pi is not None:
            vals = 0.2 + d.rand(M) if pi == "M" else 0.2 + d.rand(B, M)
            args["weights"] = make_arg(d, "weights", vals, _acc(dtype), None,
                                       layouts=["contiguous", "expanded", "size1_strides"])
    _poison_missing(d, args, stacked, order, present, "weights" if mode == "weighted" else None)

    def bind(inputs):
        feats = _feature_input(stacked, order, inputs)
        return (feats, mask(_device(inputs)), mode, inputs.get("weights"), normalize), {}

    elems = B * M * C * math.prod(spatial)
    return Case("masked_fusion", args, bind, medmap_fast.masked_fusion, reference.masked_fusion, dtype, triton_ok=elems <= 200 and dtype != torch.bfloat16,
                num_modalities=M)


def _reference_anchor_align(features, mask, pi, *, anchor, **kw):
    """reference.anchor_align, whichever name its anchor argument has."""
    params = inspect.signature(reference.anchor_align).parameters
    key = "anchor" if "anchor" in params else "anchor_kind"
    return reference.anchor_align(features, mask, pi, **{key: anchor}, **kw)


def _reduction_layouts(reduction):
    # scalar losses take a scalar gradient; (B, M) ones any 2-D layout
    return ["contiguous"] if reduction != "none" else ["contiguous", "permuted", "expanded", "size1_strides"]


def draw_anchor_align(d: Draw) -> Case:
    dtype = _dtype(d)
    B, M, C = _batch(d), d.rng.randint(1, 5), d.rng.choice([1, 2, 3, 5])
    spatial = _spatial(d)
    stacked, args, order = _features(d, B, M, C, spatial, dtype)
    present, mask = _mask(d, B, M)
    _poison_missing(d, args, stacked, order, present)
    anchor = d.choice("anchor", ["mix", "mix", "normal"])
    pi = d.choice("pi", [None, "M", "BM"]) if anchor == "mix" else None
    if pi is not None:
        args["pi"] = make_arg(d, "pi", 0.2 + (d.rand(M) if pi == "M" else d.rand(B, M)), _acc(dtype), None,
                              layouts=["contiguous", "expanded", "size1_strides"])
    sig = d.choice("sigma2", ["number", "scalar_tensor", "channel_tensor"])
    if sig != "number":
        vals = 0.5 + d.rand(C) if sig == "channel_tensor" else 0.5 + d.rand(())
        args["sigma2"] = make_arg(d, "sigma2", vals, _acc(dtype), 0, layouts=["contiguous", "expanded", "strided"])
    sigma_number = 0.25 + d.rng.random()
    detach = d.choice("detach_anchor", [False, False, True])
    reduction = d.choice("reduction", ["mean", "sum", "none"])

    def bind(inputs):
        s2 = inputs.get("sigma2", sigma_number)
        return (_feature_input(stacked, order, inputs), mask(_device(inputs)), inputs.get("pi")), dict(
            anchor=anchor, sigma2=s2, detach_anchor=detach, reduction=reduction)

    elems = B * M * C * math.prod(spatial)
    return Case("anchor_align", args, bind, medmap_fast.anchor_align, _reference_anchor_align, dtype, out_layouts=_reduction_layouts(reduction),
                triton_ok=elems <= 200 and dtype != torch.bfloat16, num_modalities=M)


def draw_moment_matching(d: Draw) -> Case:
    dtype = _dtype(d)
    B, M, C = _batch(d), d.rng.randint(1, 5), d.rng.choice([1, 2, 3, 5])
    spatial = _spatial(d)
    stacked, args, order = _features(d, B, M, C, spatial, dtype, scale=1.5, offset=0.3)
    present, mask = _mask(d, B, M)
    _poison_missing(d, args, stacked, order, present)
    target = d.choice("target", ["anchor", "normal", "mixture"])
    acc = _acc(dtype)
    small = ["contiguous", "expanded", "channels_first", "size1_strides"]
    if target == "anchor":
        pi = d.choice("pi", [None, "M", "BM"])
        if pi is not None:
            args["pi"] = make_arg(d, "pi", 0.2 + (d.rand(M) if pi == "M" else d.rand(B, M)), acc, None,
                                  layouts=["contiguous", "expanded"])
    elif target == "mixture":
        J = d.rng.randint(1, 4)
        args["nu"] = make_arg(d, "nu", d.randn(J, C), acc, 1, layouts=small)
        args["logtau2"] = make_arg(d, "logtau2", 0.3 * d.randn(J, C), acc, 1, layouts=small)
        weights = d.choice("mixture_weights", [None, "pi_mix", "pi_logits"])
        if weights == "pi_mix":
            args["pi_mix"] = make_arg(d, "pi_mix", 0.2 + d.rand(J), acc, 0, layouts=["contiguous", "expanded"])
        elif weights == "pi_logits":
            args["pi_logits"] = make_arg(d, "pi_logits", d.randn(J), acc, 0, layouts=["contiguous", "strided"])
    detach = d.choice("detach_anchor", [False, True]) if target == "anchor" else False
    eps = d.choice("eps", [1e-5, 1e-3])
    reduction = d.choice("reduction", ["mean", "sum", "none"])

    def bind(inputs):
        kw = {k: inputs.get(k) for k in ("nu", "logtau2", "pi_mix", "pi_logits")}
        return (_feature_input(stacked, order, inputs), mask(_device(inputs)), inputs.get("pi")), dict(
            target=target, detach_anchor=detach, eps=eps, reduction=reduction, **kw)

    elems = B * M * C * math.prod(spatial)
    return Case("moment_matching", args, bind, medmap_fast.moment_matching, reference.moment_matching, dtype, out_layouts=_reduction_layouts(reduction),
                triton_ok=elems <= 200 and dtype != torch.bfloat16, num_modalities=M)


def draw_gaussian_kl(d: Draw) -> Case:
    dtype = _dtype(d)
    acc = _acc(dtype)
    B, M, C = _batch(d), d.rng.randint(1, 3), d.rng.choice([1, 2, 3, 5, 8])
    spatial = _spatial(d, ndim=d.rng.randint(0, 3), sizes=(1, 2, 3))
    lead = (B, M, *spatial)
    # mu (..., C): rows of channels, C innermost ("contiguous") or read in place from a
    # (B, M, C, *spatial) feature map ("channels_first" moves C outermost, "permuted" elsewhere)
    args = {"mu": make_arg(d, "mu", d.randn(*lead, C), dtype, -1)}
    lv = d.choice("logvar", [None, "number", "channel", "full", "same_as_mu"])
    if lv == "channel":
        args["logvar"] = make_arg(d, "logvar", 0.5 * d.randn(C), dtype, 0, layouts=["contiguous", "strided",
                                                                                    "expanded"])
    elif lv == "full":
        args["logvar"] = make_arg(d, "logvar", 0.5 * d.randn(*lead, C), dtype, -1)
    lv_number = -0.3
    target = d.choice("target", ["normal", "mixture"])
    if target == "mixture":
        J = d.rng.randint(1, 4)
        small = ["contiguous", "expanded", "channels_first", "size1_strides"]
        args["nu"] = make_arg(d, "nu", d.randn(J, C), acc, 1, layouts=small)
        args["logtau2"] = make_arg(d, "logtau2", 0.3 * d.randn(J, C), acc, 1, layouts=small)
        weights = d.choice("mixture_weights", [None, "pi", "pi_logits"])
        if weights == "pi":
            args["pi"] = make_arg(d, "pi", 0.2 + d.rand(J), acc, 0, layouts=["contiguous", "expanded"])
        elif weights == "pi_logits":
            args["pi_logits"] = make_arg(d, "pi_logits", d.randn(J), acc, 0, layouts=["contiguous", "strided"])
    mask_kind = d.choice("mask", [None, "BM", "B", "BMD"])
    if mask_kind == "BMD" and not spatial:
        mask_kind = "BM"
    mvals = None
    if mask_kind == "B":
        mvals = d.rand(B) < 0.6
    elif mask_kind == "BM":
        mvals = _mask_values(d, B, M)
    elif mask_kind == "BMD":
        mvals = d.rand(B, M, spatial[0]) < 0.6
    if mvals is not None and d.chance(0.3):  # dropped rows are never read: NaN there changes nothing
        d.notes["poisoned"] = True
        with torch.no_grad():
            for name in ("mu", "logvar"):
                if name in args and args[name].layout != "expanded" and args[name].master.dim() > 1:
                    args[name].master[~mvals] = float("nan")
    reduction = d.choice("reduction", ["mean", "sum", "none"])

    def bind(inputs):
        mu = inputs["mu"]
        logvar = mu if lv == "same_as_mu" else (lv_number if lv == "number" else inputs.get("logvar"))
        mask = mvals.to(mu.device) if mvals is not None else None
        return (mu, logvar), dict(nu=inputs.get("nu"), logtau2=inputs.get("logtau2"), pi=inputs.get("pi"),
                                  pi_logits=inputs.get("pi_logits"), mask=mask, reduction=reduction)

    d.notes["same_tensor"] = "logvar=mu" if lv == "same_as_mu" else None
    out_layouts = ["contiguous"] if reduction != "none" else ["contiguous", "permuted", "expanded", "size1_strides"]
    return Case("gaussian_kl", args, bind, medmap_fast.gaussian_kl, reference.gaussian_kl, dtype, out_layouts=out_layouts,
                triton_ok=math.prod(lead) * C <= 200 and dtype != torch.bfloat16)


DRAWS = {
    "norm_act": draw_norm_act,
    "masked_fusion": draw_masked_fusion,
    "anchor_align": draw_anchor_align,
    "moment_matching": draw_moment_matching,
    "gaussian_kl": draw_gaussian_kl,
}


# ----------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------


def _backend_for(d: Draw, case: Case):
    """A backend this machine can run the case on (GPU backends when there is a GPU; Triton's CPU
    interpreter, which runs ~1e4 elements/s, only for small cases), and its device."""
    options = []
    if torch.cuda.is_available():
        options += [("triton", "cuda"), ("cuda", "cuda")]
        options += [("cpu", "cpu")]
    else:
        options += [("cpu", "cpu")] * 9
        if case.triton_ok:
            options += [("triton", "cpu")]
    usable = [(b, dev) for b, dev in options
              if _backends.reason(b, torch.device(dev), case.dtype, case.num_modalities) is None]
    if not usable:
        return None, None
    backend, dev = d.rng.choice(usable)
    d.notes["backend"] = backend
    return backend, torch.device(dev)


def _run(case: Case, fn, device, rng_seed, out_grad: "OutGrad", dtype=None, layout=None):
    """Value and gradients (w.r.t. every master that requires grad, None as 0) of one run."""
    rng = random.Random(rng_seed)
    for arg in case.args.values():
        arg.fresh_leaf(device)
    inputs = {name: materialise(arg, device, rng, dtype, layout) for name, arg in case.args.items()}
    out = fn(inputs)
    wanted = [(name, arg.leaf) for name, arg in case.args.items() if arg.requires_grad]
    grads = {}
    if wanted and out.requires_grad:
        g = out_grad.make(out, device, layout)
        got = torch.autograd.grad(out, [leaf for _, leaf in wanted], g, allow_unused=True)
        grads = dict(zip([name for name, _ in wanted], got))
    # no path to an input (unused, or a detached anchor): its gradient is 0
    grads = {name: torch.zeros_like(leaf) if grads.get(name) is None else grads[name].detach()
             for name, leaf in wanted}
    return out.detach(), grads


class OutGrad:
    """grad_output: fixed values (not all ones, some negative) in a drawn layout of its own."""

    def __init__(self, d: Draw, layouts):
        self.seed = d.rng.randrange(2**31)
        self.layout = d.choice("grad_output.layout", layouts)
        self.d = d

    def make(self, out: torch.Tensor, device, layout=None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        shape = tuple(out.shape)
        vals = (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)) * torch.where(
            torch.rand(shape, generator=gen) < 0.3, -1.0, 1.0).double()
        if self.layout == "expanded" and len(shape) > 0:
            # one value broadcast (stride 0 everywhere); the contiguous runs get the same values
            vals = vals.reshape(-1)[:1].reshape([1] * len(shape))
        layout = layout or self.layout
        rng = random.Random(self.seed)
        return lay(vals.to(device=device, dtype=out.dtype), layout, shape, 1 if len(shape) > 2 else None, rng)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    diff = (got.double().cpu() - want.double().cpu()).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def _check(what, got, want, dtype, naive=None, gain=1.0, terms=1.0):
    """Normwise: max |got - want| within the dtype's bound, scaled by the case's conditioning ``gain``;
    the absolute part also by ``terms``, the number of values each gradient element sums (an
    expanded input's, a per-channel parameter's): where they cancel, the rounding of each remains."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = _err(got, want)
    scale = want.abs().max().item() if want.numel() else 0.0
    if dtype in RTOL:
        limit = gain * (RTOL[dtype] * scale + ATOL[dtype] * terms)
        assert err <= limit, f"{what}: max error {err:.3g} > {limit:.3g} (max |exact| {scale:.3g})"
    else:
        nerr = _err(naive, want)
        limit = LOWP_RATIO * nerr + gain * (LOWP_FLOOR[dtype] * scale + ATOL[dtype] * terms)
        assert err <= limit, (f"{what}: max error {err:.3g} > {LOWP_RATIO} x the naive {dtype} reference's "
                              f"{nerr:.3g} + floor ({limit:.3g}; max |exact| {scale:.3g})")


def _replay(index: int) -> str:
    return f"replay: MEDMAP_FAST_FUZZ_SEED={BASE_SEED} python -m pytest tests/test_differential.py -k 'case_{index}]'"


@pytest.mark.parametrize("index", range(CASES), ids=lambda i: f"case_{i}")
def test_op_matches_float64_reference(index):
    seed = (BASE_SEED * 1_000_003 + index) % 2**63
    d = Draw(seed)
    op = d.choice("op", [list(DRAWS)[index % len(DRAWS)]])  # every op as often as the others
    case = DRAWS[op](d)
    backend, device = _backend_for(d, case)
    if backend is None:
        pytest.skip(f"no backend here for {case.dtype}")
    out_grad = OutGrad(d, case.out_layouts)
    about = f"{op} {d.notes}\n{_replay(index)}"
    run_seed = d.rng.randrange(2**31)

    fused = _run(case, lambda i: case.call(backend, i), device, run_seed, out_grad)
    again = _run(case, lambda i: case.call(backend, i), device, run_seed, out_grad)
    exact = _run(case, case.oracle, torch.device("cpu"), run_seed, out_grad, torch.float64, "contiguous")
    drawn = _run(case, case.oracle, torch.device("cpu"), run_seed, out_grad, torch.float64)
    naive = (_run(case, case.oracle, torch.device("cpu"), run_seed, out_grad, None, "contiguous")
             if case.dtype in HALF else None)

    # 3. bitwise determinism
    assert torch.equal(fused[0], again[0]), f"value differs between two runs\n{about}"
    for k in fused[1]:
        assert torch.equal(fused[1][k], again[1][k]), f"grad {k} differs between two runs\n{about}"
    # 2. the oracle does not depend on layouts
    largest = max(math.prod(a.shape) for a in case.args.values())
    terms = {k: max(1.0, largest / a.master.numel()) for k, a in case.args.items()}
    try:
        _check("reference value on the drawn layouts", drawn[0], exact[0], torch.float64, gain=case.gain)
        for k in exact[1]:
            _check(f"reference grad {k} on the drawn layouts", drawn[1][k], exact[1][k], torch.float64,
                   gain=case.gain, terms=terms[k])
    except AssertionError as e:
        raise AssertionError(f"{e}\nthe float64 reference itself depends on the layouts\n{about}") from None
    # 1. the op against the float64 reference
    try:
        _check("value", fused[0], exact[0], case.dtype, naive[0] if naive else None, case.gain)
        assert fused[1].keys() == exact[1].keys()
        for k in exact[1]:
            _check(f"grad {k}", fused[1][k], exact[1][k], case.dtype, naive[1][k] if naive else None, case.gain,
                   terms[k])
    except AssertionError as e:
        raise AssertionError(f"{e}\n{about}") from None
