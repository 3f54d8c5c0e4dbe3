"""Triton kernels for moment matching (SPEC section 4).

Per (sample, modality, channel): the mean and the sum of squared deviations (m2) of the features
over the voxels, and, when coef is given, the same moments of the anchor a = sum_k coef_k f_k as an
extra row M. Tiling and the per-program register-resident modality tiles follow anchor_align.

m2 must stay accurate for data far from zero (100 + noise), so it is never sum(x^2) - S mean^2:
each tile's (mean, m2) is computed two-pass from the registers, tiles are merged inside a program
with Chan's formula, and the launcher merges the programs' partials exactly the same way, with
torch ops on the small partial tensors (fixed shapes and order: deterministic).
"""

import torch
import triton
import triton.language as tl

from ._strides import check_shared_strides
from .anchor_align import (
    NUM_WARPS,
    _flag,
    _load,
    _offsets,
    _row,
    _spatial_tile,
    _store_part,
    check_modalities,
    needs_int64,
    spatial_grid,
)
from .masked_fusion import _acc, _np2, _pad


@triton.jit
def _tile_moments(tmean, tm2, kk, k: tl.constexpr, x, tile_mask, inv_n):
    mu = tl.sum(x, axis=1) * inv_n
    d = tl.where(tile_mask, x - mu[:, None], 0.0)
    tmean = tl.where(kk[:, None] == k, mu[None, :], tmean)
    tm2 = tl.where(kk[:, None] == k, tl.sum(d * d, axis=1)[None, :], tm2)
    return tmean, tm2


@triton.jit
def moments_fwd_kernel(
    coef_ptr, present_ptr, pmean_ptr, pm2_ptr,
    f0, f1, f2, f3, f4, f5, f6, f7,
    C, S, TILES, NUM_PROGS_S,
    sb, sc, ss_,
    M: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, HAS_ANCHOR: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """Per-program (mean, m2) over its voxels for rows k < M (+ the anchor's in row M)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(2)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    kk = tl.arange(0, K_PAD)
    b64 = b.to(tl.int64)
    fb = b64 * sb
    h0 = _flag(present_ptr, b, M, 0)
    if HAS_ANCHOR:
        c0 = _row(coef_ptr, b, cs, cmask, C, M, 0, ACC)
    if M > 1:
        h1 = _flag(present_ptr, b, M, 1)
        if HAS_ANCHOR:
            c1 = _row(coef_ptr, b, cs, cmask, C, M, 1, ACC)
    if M > 2:
        h2 = _flag(present_ptr, b, M, 2)
        if HAS_ANCHOR:
            c2 = _row(coef_ptr, b, cs, cmask, C, M, 2, ACC)
    if M > 3:
        h3 = _flag(present_ptr, b, M, 3)
        if HAS_ANCHOR:
            c3 = _row(coef_ptr, b, cs, cmask, C, M, 3, ACC)
    if M > 4:
        h4 = _flag(present_ptr, b, M, 4)
        if HAS_ANCHOR:
            c4 = _row(coef_ptr, b, cs, cmask, C, M, 4, ACC)
    if M > 5:
        h5 = _flag(present_ptr, b, M, 5)
        if HAS_ANCHOR:
            c5 = _row(coef_ptr, b, cs, cmask, C, M, 5, ACC)
    if M > 6:
        h6 = _flag(present_ptr, b, M, 6)
        if HAS_ANCHOR:
            c6 = _row(coef_ptr, b, cs, cmask, C, M, 6, ACC)
    if M > 7:
        h7 = _flag(present_ptr, b, M, 7)
        if HAS_ANCHOR:
            c7 = _row(coef_ptr, b, cs, cmask, C, M, 7, ACC)
    mean = tl.zeros([K_PAD, BLOCK_C], dtype=ACC)
    m2 = tl.zeros([K_PAD, BLOCK_C], dtype=ACC)
    n = tl.zeros([], dtype=ACC)
    for t in range(TILES):
        ss = _spatial_tile(pid_s, t, TILES, BLOCK_S)
        off = _offsets(cs, ss, sc, ss_, OFF64)
        tile_mask = cmask[:, None] & (ss < S)[None, :]
        n_t = tl.minimum(tl.maximum(S - (pid_s * TILES + t) * BLOCK_S, 0), BLOCK_S).to(ACC)
        inv_n = 1.0 / tl.maximum(n_t, 1.0)
        tmean = tl.zeros([K_PAD, BLOCK_C], dtype=ACC)
        tm2 = tl.zeros([K_PAD, BLOCK_C], dtype=ACC)
        # A missing modality loads as zeros and so gets (mean, m2) = (0, 0) exactly.
        x0 = _load(0, h0, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        tmean, tm2 = _tile_moments(tmean, tm2, kk, 0, x0, tile_mask, inv_n)
        if HAS_ANCHOR:
            a = c0[:, None] * x0
        if M > 1:
            x1 = _load(1, h1, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            tmean, tm2 = _tile_moments(tmean, tm2, kk, 1, x1, tile_mask, inv_n)
            if HAS_ANCHOR:
                a += c1[:, None] * x1
        if M > 2:
            x2 = _load(2, h2, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            tmean, tm2 = _tile_moments(tmean, tm2, kk, 2, x2, tile_mask, inv_n)
            if HAS_ANCHOR:
                a += c2[:, None] * x2
        if M > 3:
            x3 = _load(3, h3, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            tmean, tm2 = _tile_moments(tmean, tm2, kk, 3, x3, tile_mask, inv_n)
            if HAS_ANCHOR:
                a += c3[:, None] * x3
        if M > 4:
            x4 = _load(4, h4, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            tmean, tm2 = _tile_moments(tmean, tm2, kk, 4, x4, tile_mask, inv_n)
            if HAS_ANCHOR:
                a += c4[:, None] * x4
        if M > 5:
            x5 = _load(5, h5, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            tmean, tm2 = _tile_moments(tmean, tm2, kk, 5, x5, tile_mask, inv_n)
            if HAS_ANCHOR:
                a += c5[:, None] * x5
        if M > 6:
            x6 = _load(6, h6, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            tmean, tm2 = _tile_moments(tmean, tm2, kk, 6, x6, tile_mask, inv_n)
            if HAS_ANCHOR:
                a += c6[:, None] * x6
        if M > 7:
            x7 = _load(7, h7, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            tmean, tm2 = _tile_moments(tmean, tm2, kk, 7, x7, tile_mask, inv_n)
            if HAS_ANCHOR:
                a += c7[:, None] * x7
        if HAS_ANCHOR:
            tmean, tm2 = _tile_moments(tmean, tm2, kk, M, a, tile_mask, inv_n)
        # Chan's merge of (n, mean, m2) with this tile's (n_t, tmean, tm2); a tile past the end
        # (n_t = 0) is skipped rather than merged with weight 0, which would turn an inf mean into NaN.
        n_new = n + n_t
        frac = n_t / tl.maximum(n_new, 1.0)
        delta = tmean - mean
        keep_old = n_t == 0
        mean = tl.where(keep_old, mean, mean + delta * frac)
        m2 = tl.where(keep_old, m2, m2 + tm2 + delta * delta * (n * frac))
        n = n_new
    poff = ((b * K + kk[:, None]) * C + cs[None, :]).to(tl.int64) * NUM_PROGS_S + pid_s
    pmask = (kk < K)[:, None] & cmask[None, :]
    tl.store(pmean_ptr + poff, mean, mask=pmask)
    tl.store(pm2_ptr + poff, m2, mask=pmask)


@triton.jit
def _mbwd_slot(here, al, be, mu, c, x, da, gp, gb, goff, tile_mask, HAS_ANCHOR: tl.constexpr):
    grad = al[:, None] + be[:, None] * (x - mu[:, None])
    if HAS_ANCHOR:
        grad += c[:, None] * da
    tl.store(gp + gb + goff, tl.where(here, grad, 0.0).to(gp.dtype.element_ty), mask=tile_mask)


@triton.jit
def _mbwd_coefs(present_ptr, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C,
                M: tl.constexpr, K: tl.constexpr, k: tl.constexpr, HAS_ANCHOR: tl.constexpr, ACC: tl.constexpr):
    here = _flag(present_ptr, b, M, k)
    al = _row(alpha_ptr, b, cs, cmask, C, K, k, ACC)
    be = _row(beta_ptr, b, cs, cmask, C, K, k, ACC)
    mu = _row(mean_ptr, b, cs, cmask, C, K, k, ACC)
    if HAS_ANCHOR:
        c = _row(coef_ptr, b, cs, cmask, C, M, k, ACC)
    else:
        c = al  # unused without the anchor
    return here, al, be, mu, c


@triton.jit
def moments_bwd_kernel(
    coef_ptr, present_ptr, mean_ptr, alpha_ptr, beta_ptr, partial_ptr,
    f0, f1, f2, f3, f4, f5, f6, f7,
    g0, g1, g2, g3, g4, g5, g6, g7,
    C, S, TILES, NUM_PROGS_S,
    sb, sc, ss_,
    db, dc, ds,
    M: tl.constexpr, K: tl.constexpr, HAS_ANCHOR: tl.constexpr, NEED_COEF: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """grad_f_k = alpha_k + beta_k (f_k - mean_k) [+ coef_k da]; optional partial sums of f_k da."""
    pid_s = tl.program_id(0)
    b = tl.program_id(2)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b64 = b.to(tl.int64)
    fb = b64 * sb
    gb = b64 * db
    P = present_ptr
    h0, al0, be0, mu0, c0 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 0,
                                        HAS_ANCHOR, ACC)
    if M > 1:
        h1, al1, be1, mu1, c1 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 1,
                                            HAS_ANCHOR, ACC)
    if M > 2:
        h2, al2, be2, mu2, c2 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 2,
                                            HAS_ANCHOR, ACC)
    if M > 3:
        h3, al3, be3, mu3, c3 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 3,
                                            HAS_ANCHOR, ACC)
    if M > 4:
        h4, al4, be4, mu4, c4 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 4,
                                            HAS_ANCHOR, ACC)
    if M > 5:
        h5, al5, be5, mu5, c5 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 5,
                                            HAS_ANCHOR, ACC)
    if M > 6:
        h6, al6, be6, mu6, c6 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 6,
                                            HAS_ANCHOR, ACC)
    if M > 7:
        h7, al7, be7, mu7, c7 = _mbwd_coefs(P, coef_ptr, mean_ptr, alpha_ptr, beta_ptr, b, cs, cmask, C, M, K, 7,
                                            HAS_ANCHOR, ACC)
    if HAS_ANCHOR:
        al_a = _row(alpha_ptr, b, cs, cmask, C, K, M, ACC)
        be_a = _row(beta_ptr, b, cs, cmask, C, K, M, ACC)
        mu_a = _row(mean_ptr, b, cs, cmask, C, K, M, ACC)
    if NEED_COEF:
        q0 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        if M > 1:
            q1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        if M > 2:
            q2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        if M > 3:
            q3 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        if M > 4:
            q4 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        if M > 5:
            q5 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        if M > 6:
            q6 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        if M > 7:
            q7 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for t in range(TILES):
        ss = _spatial_tile(pid_s, t, TILES, BLOCK_S)
        off = _offsets(cs, ss, sc, ss_, OFF64)
        goff = _offsets(cs, ss, dc, ds, OFF64)
        tile_mask = cmask[:, None] & (ss < S)[None, :]
        x0 = _load(0, h0, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if M > 1:
            x1 = _load(1, h1, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if M > 2:
            x2 = _load(2, h2, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if M > 3:
            x3 = _load(3, h3, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if M > 4:
            x4 = _load(4, h4, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if M > 5:
            x5 = _load(5, h5, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if M > 6:
            x6 = _load(6, h6, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if M > 7:
            x7 = _load(7, h7, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        if HAS_ANCHOR:
            a = c0[:, None] * x0
            if M > 1:
                a += c1[:, None] * x1
            if M > 2:
                a += c2[:, None] * x2
            if M > 3:
                a += c3[:, None] * x3
            if M > 4:
                a += c4[:, None] * x4
            if M > 5:
                a += c5[:, None] * x5
            if M > 6:
                a += c6[:, None] * x6
            if M > 7:
                a += c7[:, None] * x7
            da = al_a[:, None] + be_a[:, None] * (a - mu_a[:, None])
        else:
            da = x0  # unused without the anchor
        _mbwd_slot(h0, al0, be0, mu0, c0, x0, da, g0, gb, goff, tile_mask, HAS_ANCHOR)
        if NEED_COEF:
            q0 += x0 * da
        if M > 1:
            _mbwd_slot(h1, al1, be1, mu1, c1, x1, da, g1, gb, goff, tile_mask, HAS_ANCHOR)
            if NEED_COEF:
                q1 += x1 * da
        if M > 2:
            _mbwd_slot(h2, al2, be2, mu2, c2, x2, da, g2, gb, goff, tile_mask, HAS_ANCHOR)
            if NEED_COEF:
                q2 += x2 * da
        if M > 3:
            _mbwd_slot(h3, al3, be3, mu3, c3, x3, da, g3, gb, goff, tile_mask, HAS_ANCHOR)
            if NEED_COEF:
                q3 += x3 * da
        if M > 4:
            _mbwd_slot(h4, al4, be4, mu4, c4, x4, da, g4, gb, goff, tile_mask, HAS_ANCHOR)
            if NEED_COEF:
                q4 += x4 * da
        if M > 5:
            _mbwd_slot(h5, al5, be5, mu5, c5, x5, da, g5, gb, goff, tile_mask, HAS_ANCHOR)
            if NEED_COEF:
                q5 += x5 * da
        if M > 6:
            _mbwd_slot(h6, al6, be6, mu6, c6, x6, da, g6, gb, goff, tile_mask, HAS_ANCHOR)
            if NEED_COEF:
                q6 += x6 * da
        if M > 7:
            _mbwd_slot(h7, al7, be7, mu7, c7, x7, da, g7, gb, goff, tile_mask, HAS_ANCHOR)
            if NEED_COEF:
                q7 += x7 * da
    if NEED_COEF:
        _store_part(partial_ptr, q0, h0, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 0)
        if M > 1:
            _store_part(partial_ptr, q1, h1, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 1)
        if M > 2:
            _store_part(partial_ptr, q2, h2, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 2)
        if M > 3:
            _store_part(partial_ptr, q3, h3, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 3)
        if M > 4:
            _store_part(partial_ptr, q4, h4, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 4)
        if M > 5:
            _store_part(partial_ptr, q5, h5, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 5)
        if M > 6:
            _store_part(partial_ptr, q6, h6, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 6)
        if M > 7:
            _store_part(partial_ptr, q7, h7, b, cs, cmask, C, pid_s, NUM_PROGS_S, M, 7)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def moments_fwd(feats, coef, present, mean, m2):
    M = check_modalities(feats)
    B, C, S = feats[0].shape
    has_anchor = coef is not None
    K = M + int(has_anchor)
    if B * C == 0:
        return
    if S == 0:
        mean.zero_()
        m2.zero_()
        return
    bc, bs, tiles, grid = spatial_grid(feats[0])
    n_progs = grid[0]
    pmean = torch.empty((B, K, C, n_progs), device=mean.device, dtype=mean.dtype)
    pm2 = torch.empty_like(pmean)
    moments_fwd_kernel[grid](
        coef if has_anchor else pmean, present, pmean, pm2, *_pad(feats),
        C, S, tiles, n_progs, *feats[0].stride(),
        M=M, K=K, K_PAD=_np2(K), HAS_ANCHOR=has_anchor, BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(feats[0].dtype),
        OFF64=needs_int64(feats[0]), num_warps=NUM_WARPS,
    )
    # Merge the programs' (n_p, mean_p, m2_p): mean = sum n_p mean_p / S,
    # m2 = sum m2_p + sum n_p (mean_p - mean)^2 (Chan's formula over all parts at once).
    span = tiles * bs
    n_p = (S - torch.arange(n_progs, device=mean.device, dtype=torch.int64) * span).clamp(0, span).to(mean.dtype)
    torch.sum(pmean * n_p, dim=-1, out=mean)
    mean.div_(S)
    dev = pmean - mean.unsqueeze(-1)
    torch.sum(pm2, dim=-1, out=m2)
    m2.add_(torch.sum(dev * dev * n_p, dim=-1))


def moments_bwd(feats, coef, present, mean, alpha, beta, grad_feats, grad_coef):
    M = check_modalities(feats)
    if len(grad_feats) != M:
        raise ValueError(f"grad_feats: expected {M} tensors, got {len(grad_feats)}")
    check_shared_strides(grad_feats, "grad_feats")
    has_anchor = coef is not None
    need = grad_coef is not None
    if need and not has_anchor:
        raise ValueError("moments_bwd: grad_coef needs coef (the anchor's moments)")
    B, C, S = feats[0].shape
    if B * C == 0:
        return
    if S == 0:
        if need:
            grad_coef.zero_()
        return
    bc, bs, tiles, grid = spatial_grid(feats[0])
    partial = torch.empty((B, M, C, grid[0]) if need else (1,), device=alpha.device, dtype=alpha.dtype)
    moments_bwd_kernel[grid](
        coef if has_anchor else alpha, present, mean, alpha, beta, partial, *_pad(feats), *_pad(grad_feats),
        C, S, tiles, grid[0], *feats[0].stride(), *grad_feats[0].stride(),
        M=M, K=M + int(has_anchor), HAS_ANCHOR=has_anchor, NEED_COEF=need,
        BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(feats[0].dtype), OFF64=needs_int64(feats[0], grad_feats[0]),
        num_warps=NUM_WARPS,
    )
    if need:
        torch.sum(partial, dim=-1, out=grad_coef)
