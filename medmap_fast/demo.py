"""``medmap-fast demo``: the fused ops against the naive reference on realistic shapes.

Prints, for masked fusion (per mode and layout), the alignment losses (anchor_align,
moment_matching, gaussian_kl to a mixture) and the fused norm + activation (per layout), the largest error against a float64 reference (forward
and every gradient) and the forward+backward time of the fused op and of the reference (and, with
--compile, of torch.compile(reference)), with the achieved bandwidth as a fraction of the measured
copy bandwidth.
"""

from __future__ import annotations

import argparse

import torch

from . import _bench, dispatch, reference
from .ops import anchor_align, gaussian_kl, masked_fusion, moment_matching, norm_act
from .ops import _backends


def _inputs(B, M, C, size, layout, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = []
    for _ in range(M):
        f = torch.randn(B, C, size, size, size, generator=g).to(device=device, dtype=dtype)
        if layout == "channels_last":
            f = f.contiguous(memory_format=torch.channels_last_3d)
        feats.append(f.requires_grad_())
    mask = torch.ones(B, M, dtype=torch.bool, device=device)
    if B > 1:
        mask[0, 1] = False  # one sample misses a modality: the common clinical case
    weights = torch.randn(B, M, generator=g).to(device).requires_grad_()
    return feats, mask, weights


def _run(fn, feats, mask, weights, mode, grad_out):
    out = fn(feats, mask, mode, weights if mode == "weighted" else None)
    leaves = feats + ([weights] if mode == "weighted" else [])
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


def _rel_err(a, b):
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    return (a.double() - b.double()).abs().max().item() / max(b.abs().max().item(), 1e-30)


def main(argv=None):
    p = argparse.ArgumentParser(prog="medmap-fast demo", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="volume edge (default 64 on CPU, 128 on GPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--modalities", type=int, default=4)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--backend", default=None, choices=dispatch.BACKENDS, help="force a backend (default: automatic)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference) (slow to compile)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    size = args.size or (128 if device.type == "cuda" else 64)
    B, M, C = args.batch, args.modalities, args.channels
    chosen = dispatch.select("masked_fusion", device, args.backend,
                             lambda n: _backends.reason(n, device, torch.float32, M))
    bw = _bench.copy_bandwidth(device)
    print(f"masked_fusion on {device} ({chosen} backend), B={B} M={M} C={C} {size}^3 float32, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s, torch {torch.__version__}")
    fused = lambda f, m, mode, w: masked_fusion(f, m, mode, w, backend=args.backend)
    naive = reference.masked_fusion
    compiled = torch.compile(naive) if args.compile else None

    header = f"{'mode':12s} {'layout':14s} {'rel err':>9s} {'fused ms':>9s} {'GB/s':>7s} {'of copy':>7s} {'ref ms':>8s} {'speedup':>7s}"
    if compiled:
        header += f" {'compile ms':>10s} {'vs compile':>10s}"
    print(header)
    for mode in ("mean", "weighted", "zero_concat"):
        for layout in ("ncdhw", "channels_last"):
            feats, mask, weights = _inputs(B, M, C, size, layout, device, torch.float32, seed=hash((mode, layout)) & 0xFFFF)
            grad_out = torch.randn_like(fused(feats, mask, mode, weights if mode == "weighted" else None))
            out, grads = _run(fused, feats, mask, weights, mode, grad_out)
            f64 = [f.detach().double().requires_grad_() for f in feats]
            w64 = weights.detach().double().requires_grad_()
            out64, grads64 = _run(naive, f64, mask, w64, mode, grad_out.double())
            err = max([_rel_err(out, out64)] + [_rel_err(a, b) for a, b in zip(grads, grads64)])
            del out, grads, out64, grads64, f64

            t_fused = _bench.median(_bench.time_call(lambda: _run(fused, feats, mask, weights, mode, grad_out), device, 1, args.repeat))
            t_ref = _bench.median(_bench.time_call(lambda: _run(naive, feats, mask, weights, mode, grad_out), device, 1, args.repeat))
            nbytes = _bench.fusion_bytes(mode, B, M, C, size ** 3, 4, True, mode == "weighted")
            line = (f"{mode:12s} {layout:14s} {err:9.2e} {t_fused * 1e3:9.2f} {nbytes / t_fused / 1e9:7.1f} "
                    f"{nbytes / t_fused / bw:7.0%} {t_ref * 1e3:8.2f} {t_ref / t_fused:6.1f}x")
            if compiled:
                t_c = _bench.median(_bench.time_call(lambda: _run(compiled, feats, mask, weights, mode, grad_out), device, 2, args.repeat))
                line += f" {t_c * 1e3:10.2f} {t_c / t_fused:9.1f}x"
            print(line, flush=True)
    _alignment(B, M, C, size, device, args, bw, header)
    _norm_act(B, C, size, device, args, bw, header)
    print("(forward+backward; rel err = max |fused - float64 reference| / max |reference|, worst of the output and all gradients)")


def _alignment_cases(B, M, C, size, device, backend):
    """(name, fused fn, reference fn, inputs, bytes moved forward+backward) for each alignment loss."""
    feats, mask, _ = _inputs(B, M, C, size, "ncdhw", device, torch.float32, seed=7)
    # Away from uniform weights: there the anchor is the plain mean, where the loss is stationary in
    # theta and its gradient is 0 up to rounding (a meaningless relative error).
    theta = (0.5 * torch.randn(M, generator=torch.Generator().manual_seed(3))).to(device).requires_grad_()
    n = B * C * size ** 3 * 4
    yield ("anchor_align", lambda f, t: anchor_align(f[:M], mask, t.softmax(0), backend=backend),
           lambda f, t: reference.anchor_align(f[:M], mask, t.softmax(0)), feats + [theta], 3 * M * n)
    yield ("moment_matching", lambda f, t: moment_matching(f[:M], mask, t.softmax(0), backend=backend),
           lambda f, t: reference.moment_matching(f[:M], mask, t.softmax(0)), feats + [theta], 3 * M * n)
    J, side = 4, max(size // 2, 2)
    N = B * M * side ** 3
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(N, C, generator=g).to(device).requires_grad_(),
            (0.3 * torch.randn(N, C, generator=g)).to(device).requires_grad_(),
            torch.randn(J, C, generator=g).to(device).requires_grad_(),
            torch.zeros(J, C, device=device, requires_grad=True),
            torch.zeros(J, device=device, requires_grad=True)]
    yield (f"gaussian_kl J={J}",
           lambda f, _t: gaussian_kl(f[0], f[1], nu=f[2], logtau2=f[3], pi_logits=f[4], backend=backend),
           lambda f, _t: reference.gaussian_kl(f[0], f[1], f[2], f[3], None, f[4]), rows + [None],
           _bench.kl_bytes(N, C, J, 4, True))


def _alignment(B, M, C, size, device, args, bw, header):
    print(f"\nalignment losses (forward+backward, learned pi = softmax(theta), one sample misses a modality; "
          f"gaussian_kl: N = {B}*{M}*{max(size // 2, 2)}^3 rows)")
    print(header.replace("mode        ", "op          ", 1).replace("layout        ", "              ", 1))
    for name, fused, naive, inputs, nbytes in _alignment_cases(B, M, C, size, device, args.backend):
        leaves = [t for t in inputs if t is not None]
        feats, theta = inputs[:-1], inputs[-1]

        def run(fn, fs=feats, th=theta, lv=leaves):
            return torch.autograd.grad(fn(fs, th), lv, torch.tensor(0.75, device=device))

        grads = run(fused)
        loss = fused(feats, theta).detach()
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        f64, th64 = leaves64[: len(feats)], (leaves64[-1] if theta is not None else None)
        loss64 = naive(f64, th64)
        grads64 = torch.autograd.grad(loss64, leaves64, torch.tensor(0.75, dtype=torch.float64, device=device))
        err = max([_rel_err(loss, loss64)] + [_rel_err(a, b) for a, b in zip(grads, grads64)])
        del grads, grads64, leaves64
        t_fused = _bench.median(_bench.time_call(lambda: run(fused), device, 1, args.repeat))
        t_ref = _bench.median(_bench.time_call(lambda: run(naive), device, 1, args.repeat))
        line = (f"{name:27s} {err:9.2e} {t_fused * 1e3:9.2f} {nbytes / t_fused / 1e9:7.1f} "
                f"{nbytes / t_fused / bw:7.0%} {t_ref * 1e3:8.2f} {t_ref / t_fused:6.1f}x")
        if args.compile:
            comp = torch.compile(naive)
            t_c = _bench.median(_bench.time_call(lambda: run(comp), device, 2, args.repeat))
            line += f" {t_c * 1e3:10.2f} {t_c / t_fused:9.1f}x"
        print(line, flush=True)


def _norm_act(B, C, size, device, args, bw, header):
    print(f"\nnorm_act: instance norm + LeakyReLU(0.01), B={B} C={C} {size}^3 float32, x = 100 + 50 randn "
          "(reference: F.instance_norm + F.leaky_relu)")
    print(header.replace("mode        ", "op          ", 1))
    g = torch.Generator().manual_seed(5)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(device).requires_grad_()
    b = (0.1 * torch.randn(C, generator=g)).to(device).requires_grad_()
    for layout in ("ncdhw", "channels_last"):
        x = (100 + 50 * torch.randn(B, C, size, size, size, generator=g)).to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_()
        dy = torch.randn(x.shape, generator=g).to(device)

        fused = lambda x_, w_, b_: norm_act(x_, w_, b_, backend=args.backend)  # noqa: E731
        y = fused(x, w, b)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
        y64 = reference.norm_act(*leaves64)
        grads64 = torch.autograd.grad(y64, leaves64, dy.double())
        err = max([_rel_err(y, y64)] + [_rel_err(a, c) for a, c in zip(grads, grads64)])
        del y, grads, y64, grads64, leaves64
        step = lambda fn: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)  # noqa: E731
        t_fused = _bench.median(_bench.time_call(lambda: step(fused), device, 1, args.repeat))
        t_ref = _bench.median(_bench.time_call(lambda: step(reference.norm_act), device, 1, args.repeat))
        nbytes = 5 * x.numel() * 4  # floor: x and y forward; x, dy and dx backward
        line = (f"{'norm_act':12s} {layout:14s} {err:9.2e} {t_fused * 1e3:9.2f} {nbytes / t_fused / 1e9:7.1f} "
                f"{nbytes / t_fused / bw:7.0%} {t_ref * 1e3:8.2f} {t_ref / t_fused:6.1f}x")
        if args.compile:
            comp = torch.compile(reference.norm_act)
            t_c = _bench.median(_bench.time_call(lambda: step(comp), device, 2, args.repeat))
            line += f" {t_c * 1e3:10.2f} {t_c / t_fused:9.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
