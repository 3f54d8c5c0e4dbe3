"""Every fused op against its eager reference at every U-Net level, 8^3 to 128^3, in one process.

The deep levels of a U-Net hold small tensors, where a call's fixed cost (argument checks, dispatch,
autograd glue, host read-backs) is as large as its kernels; the shallow levels hold large ones,
where bandwidth decides. Each op runs at U-Net shapes: B=2, M=4 modalities (sample 0 missing its
second one), float32, NCDHW, and the channel count a level with that spatial size has
(``CHANNELS``: 256 at 8^3, 128 at 16^3, 64 at 32^3, 32 at 64^3, 16 at 128^3), forward (under
no_grad) and forward + backward (gradients into the features and every learnable weight).

* masked_fusion: ``mean``, ``weighted`` ((B, M) weights, softmax-normalised), ``zero_concat``,
  ``anchor_impute`` (pi = softmax(theta));
* anchor_align and moment_matching (anchor target), pi = softmax(theta);
* gaussian_kl: rows are the voxels of one (B, C, D, H, W) level read in place as (B, D, H, W, C),
  to N(0, I) ("normal") and to a learnable J=4 mixture ("mixture");
* norm_act: instance norm (affine) + LeakyReLU(0.01), without and with a residual.

Sizes: ``MEDMAP_FAST_BENCH_SIZES`` (default "8,16,32,64,128"), or the one size of
``MEDMAP_FAST_BENCH_SIZE`` (as CI runs the benchmarks, with 3 rounds so that this file takes
seconds); ``MEDMAP_FAST_BENCH_ROUNDS`` overrides the rounds.

    pytest benchmarks/test_bench_op_sizes.py --benchmark-only            # the table is printed at the end
    python benchmarks/test_bench_op_sizes.py [--sizes 8,16] [--ops anchor_align,norm_act]   # no pytest

The script form alternates fused and eager calls round by round (slow drifts of a shared machine
hit both alike) and prints the same table: ms per call and fused / eager (below 1: fused is faster).
"""

from __future__ import annotations

import os
import sys

import torch

import medmap_fast
from medmap_fast import _bench, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/_timing.py, beside this file)

B, M, J = 2, 4, 4
PASSES = ("fwd", "fwd_bwd")
OPS = (
    "masked_fusion mean",
    "masked_fusion weighted",
    "masked_fusion zero_concat",
    "masked_fusion anchor_impute",
    "anchor_align",
    "moment_matching",
    "gaussian_kl normal",
    "gaussian_kl mixture",
    "norm_act",
    "norm_act residual",
)
# Channels of a U-Net level with this spatial size (doubling per level down, from 16 at 128^3).
CHANNELS = {8: 256, 16: 128, 32: 64, 64: 32, 128: 16}
# Rounds per size on the CPU: many where a call takes a millisecond, few where eager takes seconds.
ROUNDS = {8: 41, 16: 21, 32: 11, 64: 5, 128: 3}


def sizes() -> list:
    if os.environ.get("MEDMAP_FAST_BENCH_SIZES"):
        return [int(s) for s in os.environ["MEDMAP_FAST_BENCH_SIZES"].split(",") if s.strip()]
    if os.environ.get("MEDMAP_FAST_BENCH_SIZE"):
        return [int(os.environ["MEDMAP_FAST_BENCH_SIZE"])]
    return [8, 16, 32, 64, 128]


def channels(size: int) -> int:
    return CHANNELS.get(size, min(max(2048 // size, 16), 320))


def rounds(size: int, device: torch.device) -> int:
    if os.environ.get("MEDMAP_FAST_BENCH_ROUNDS"):
        return int(os.environ["MEDMAP_FAST_BENCH_ROUNDS"])
    if os.environ.get("MEDMAP_FAST_BENCH_SIZE") and not os.environ.get("MEDMAP_FAST_BENCH_SIZES"):
        return 3  # the small CI run: only checks that every case still runs
    if device.type == "cuda":
        return 30
    return ROUNDS.get(size, 3)


def _randn(g, shape, device, scale=1.0):
    return (scale * torch.randn(*shape, generator=g)).to(device).requires_grad_()


def make_case(op: str, size: int, device: torch.device):
    """(fused, eager, leaves, shape): two zero-argument callables computing the same thing, and the
    tensors whose gradients forward + backward asks for."""
    C = channels(size)
    sp = (size, size, size)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, M, dtype=torch.bool, device=device)
    mask[0, 1] = False  # sample 0 has no T1ce
    shape = f"B={B} M={M} C={C} {size}^3"
    if op.startswith("masked_fusion") or op in ("anchor_align", "moment_matching"):
        feats = [_randn(g, (B, C, *sp), device) for _ in range(M)]
        theta = _randn(g, (M,), device, 0.1)
        if op == "masked_fusion weighted":
            w = _randn(g, (B, M), device)
            return (lambda: medmap_fast.masked_fusion(feats, mask, "weighted", w, normalize=True),
                    lambda: reference.masked_fusion(feats, mask, "weighted", w, normalize=True), feats + [w], shape)
        if op in ("masked_fusion mean", "masked_fusion zero_concat"):
            mode = op.split()[1]
            return (lambda: medmap_fast.masked_fusion(feats, mask, mode),
                    lambda: reference.masked_fusion(feats, mask, mode), feats, shape)
        if op == "masked_fusion anchor_impute":
            return (lambda: medmap_fast.masked_fusion(feats, mask, "anchor_impute", theta.softmax(0)),
                    lambda: reference.masked_fusion(feats, mask, "anchor_impute", theta.softmax(0)),
                    feats + [theta], shape)
        fused_op, ref_op = getattr(medmap_fast, op), getattr(reference, op)
        return (lambda: fused_op(feats, mask, theta.softmax(0)), lambda: ref_op(feats, mask, theta.softmax(0)),
                feats + [theta], shape)
    if op.startswith("gaussian_kl"):
        mu = _randn(g, (B, C, *sp), device)
        lv = _randn(g, (B, C, *sp), device, 0.3)
        rows = lambda t: t.movedim(1, -1)  # noqa: E731  (B, D, H, W, C), read in place
        shape = f"N={B * size ** 3} rows C={C}"
        if op == "gaussian_kl normal":
            return (lambda: medmap_fast.gaussian_kl(rows(mu), rows(lv)),
                    lambda: reference.gaussian_kl(rows(mu), rows(lv)), [mu, lv], shape)
        nu = _randn(g, (J, C), device)
        lt = _randn(g, (J, C), device, 0.1)
        pl = _randn(g, (J,), device, 0.1)
        return (lambda: medmap_fast.gaussian_kl(rows(mu), rows(lv), nu=nu, logtau2=lt, pi_logits=pl),
                lambda: reference.gaussian_kl(rows(mu), rows(lv), nu, lt, None, pl),
                [mu, lv, nu, lt, pl], shape + f" J={J}")
    if op.startswith("norm_act"):
        x = _randn(g, (B, C, *sp), device)
        w = (1 + 0.1 * torch.randn(C, generator=g)).to(device).requires_grad_()
        b = _randn(g, (C,), device, 0.1)
        shape = f"B={B} C={C} {size}^3"
        if op == "norm_act":
            return (lambda: medmap_fast.norm_act(x, w, b), lambda: reference.norm_act(x, w, b), [x, w, b], shape)
        r = _randn(g, (B, C, *sp), device)
        return (lambda: medmap_fast.norm_act(x, w, b, residual=r),
                lambda: reference.norm_act(x, w, b, residual=r), [x, w, b, r], shape)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def runner(fn, leaves, pass_: str, device: torch.device):
    """One timed call: the forward under no_grad, or forward + backward (grad_output 0.75, not 1)."""
    grad_out = None if pass_ == "fwd" else torch.full_like(fn().detach(), 0.75)
    return _timing.runner(fn, leaves, pass_, device, grad_out)


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script form needs no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["fused", "reference"])
    @pytest.mark.parametrize("pass_", PASSES)
    @pytest.mark.parametrize("size", sizes())
    @pytest.mark.parametrize("op", OPS)
    def test_op_size(benchmark, device, op, size, pass_, impl):
        fused, eager, leaves, shape = make_case(op, size, device)
        run = runner(fused if impl == "fused" else eager, leaves, pass_, device)
        benchmark.group = f"sizes {op} {size}^3 {pass_}"
        benchmark.extra_info.update(impl=impl, op=op, size=size, pass_=pass_, shape=shape + " fp32")
        benchmark.pedantic(run, rounds=rounds(size, device), iterations=1, warmup_rounds=2)


# ----------------------------------------------------------------------------------------------
# Script form: the same cases, fused and eager alternated round by round
# ----------------------------------------------------------------------------------------------


def measure(ops=OPS, sizes_=None, passes=PASSES, device=None, log=print):
    """Rows (op, size, pass, fused s, eager s) of medians over rounds(size) alternated calls."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for size in sizes_ or sizes():
        for op in ops:
            fused, eager, leaves, _ = make_case(op, size, device)
            for pass_ in passes:
                runs = {"fused": runner(fused, leaves, pass_, device),
                        "reference": runner(eager, leaves, pass_, device)}
                times = {k: [] for k in runs}
                for r in runs.values():  # warm-up
                    r(), r()
                for _ in range(rounds(size, device)):
                    for k, r in runs.items():
                        times[k] += _bench.time_call(r, device, warmup=0, repeat=1)
                row = dict(op=op, size=size, pass_=pass_, fused=_bench.median(times["fused"]),
                           reference=_bench.median(times["reference"]))
                rows.append(row)
                if log:
                    log(f"  {op:28s} {size:4d}^3 {pass_:8s} fused {row['fused'] * 1e3:9.3f} ms  "
                        f"eager {row['reference'] * 1e3:9.3f} ms  {row['fused'] / row['reference']:5.2f}")
            del fused, eager, leaves
    return rows


def main(argv=None):
    import argparse

    from summarize import size_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default: MEDMAP_FAST_BENCH_SIZES or 8..128)")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of: {', '.join(OPS)}")
    p.add_argument("--passes", default="fwd,fwd_bwd")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",")] if args.ops else list(OPS)
    sz = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = measure(ops, sz, args.passes.split(","))
    print("\n".join(size_table(rows)))


if __name__ == "__main__":
    main()
