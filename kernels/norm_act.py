"""Triton kernels for normalisation + activation (+ residual) (SPEC section 5).

The contract is csrc/cpu/norm_act_cpu.h. x is a (B, C, S) view; a group holds C / G consecutive
channels of one sample. The statistics need a full read of x before anything can be normalised, so
each direction is two passes over the data with tiny (B, C)-sized torch work between them:

* forward: per-(sample, channel) moments with the moment-matching kernel (one read of x; per-tile
  two-pass moments merged with Chan's formula, accurate for data far from zero), merged into group
  statistics on the tiny (B, C) tensors, then one elementwise pass (read x, write y);
* backward: one pass summing g and g * xhat per (sample, channel) into per-program partials (read x
  and dy; the activation's derivative is recomputed from x and the statistics), the tiny group terms
  in torch, then one elementwise pass writing dx (read x and dy again).

Partial sums are reduced by torch.sum in a fixed order: no atomics, bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from ._strides import same_strides
from .anchor_align import NUM_WARPS, _offsets, _spatial_tile, needs_int64, spatial_grid
from .masked_fusion import _acc
from .moment_matching import moments_fwd


@triton.jit
def _channel_row(ptr, b, cs, cmask, C, ACC: tl.constexpr):
    return tl.load(ptr + b * C + cs, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _program(mean_ptr, rstd_ptr, w_ptr, b_ptr, C, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """This program's spatial chunk, sample, channels, and their statistics and affine parameters."""
    b = tl.program_id(2)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    mu = _channel_row(mean_ptr, b, cs, cmask, C, ACC)
    rs = _channel_row(rstd_ptr, b, cs, cmask, C, ACC)
    w = _channel_row(w_ptr, 0, cs, cmask, C, ACC)
    bb = _channel_row(b_ptr, 0, cs, cmask, C, ACC)
    return tl.program_id(0), b.to(tl.int64), cs, cmask, mu, rs, w, bb


@triton.jit
def _recompute(x_ptr, r_ptr, dy_ptr, xb, off, dyb, dyoff, m, mu, rs, w, bb, slope, MODE: tl.constexpr,
               ACC: tl.constexpr):
    """xhat and g = dy * act'(z) of one tile (z with the residual in mode 1)."""
    x = tl.load(x_ptr + xb + off, mask=m, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + dyb + dyoff, mask=m, other=0.0).to(ACC)
    xhat = (x - mu[:, None]) * rs[:, None]
    z = xhat * w[:, None] + bb[:, None]
    if MODE == 1:
        z += tl.load(r_ptr + xb + off, mask=m, other=0.0).to(ACC)
    g = tl.where(z > 0, dy, dy * slope)
    return xhat, g


@triton.jit
def norm_act_fwd_kernel(
    x_ptr, r_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
    C, S, TILES, slope,
    sb, sc, ss_,
    yb, yc, ys,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """y = act((x - mean) * rstd * w + b [+ r]) [+ r]; mean/rstd per (sample, channel)."""
    pid_s, b64, cs, cmask, mu, rs, w, bb = _program(mean_ptr, rstd_ptr, w_ptr, b_ptr, C, BLOCK_C, ACC)
    for t in range(TILES):
        ss = _spatial_tile(pid_s, t, TILES, BLOCK_S)
        off = _offsets(cs, ss, sc, ss_, OFF64)
        m = cmask[:, None] & (ss < S)[None, :]
        x = tl.load(x_ptr + b64 * sb + off, mask=m, other=0.0).to(ACC)
        z = (x - mu[:, None]) * rs[:, None] * w[:, None] + bb[:, None]
        if MODE != 0:
            r = tl.load(r_ptr + b64 * sb + off, mask=m, other=0.0).to(ACC)
        if MODE == 1:
            z += r
        y = tl.where(z > 0, z, z * slope)
        if MODE == 2:
            y += r
        tl.store(y_ptr + b64 * yb + _offsets(cs, ss, yc, ys, OFF64), y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def norm_act_bwd_sums_kernel(
    x_ptr, r_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, pg_ptr, pgx_ptr,
    C, S, TILES, NUM_PROGS_S, slope,
    sb, sc, ss_,
    db, dc, ds,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """This program's sums of g and g * xhat per channel into partial[b, c, pid_s]."""
    pid_s, b64, cs, cmask, mu, rs, w, bb = _program(mean_ptr, rstd_ptr, w_ptr, b_ptr, C, BLOCK_C, ACC)
    sum_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for t in range(TILES):
        ss = _spatial_tile(pid_s, t, TILES, BLOCK_S)
        m = cmask[:, None] & (ss < S)[None, :]
        # Masked-off elements load dy = 0, so they add exactly 0 to both sums.
        xhat, g = _recompute(x_ptr, r_ptr, dy_ptr, b64 * sb, _offsets(cs, ss, sc, ss_, OFF64), b64 * db,
                             _offsets(cs, ss, dc, ds, OFF64), m, mu, rs, w, bb, slope, MODE, ACC)
        sum_g += g
        sum_gx += g * xhat
    poff = (b64 * C + cs) * NUM_PROGS_S + pid_s
    tl.store(pg_ptr + poff, tl.sum(sum_g, axis=1), mask=cmask)
    tl.store(pgx_ptr + poff, tl.sum(sum_gx, axis=1), mask=cmask)


@triton.jit
def norm_act_bwd_dx_kernel(
    x_ptr, r_ptr, dy_ptr, dx_ptr, dres_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, m1_ptr, m2_ptr,
    C, S, TILES, slope,
    sb, sc, ss_,
    db, dc, ds,
    ob, oc, os_,
    MODE: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """dx = rstd * (g w - m1 - xhat m2); dres = g. m1, m2 per (sample, channel), from the group."""
    pid_s, b64, cs, cmask, mu, rs, w, bb = _program(mean_ptr, rstd_ptr, w_ptr, b_ptr, C, BLOCK_C, ACC)
    m1 = _channel_row(m1_ptr, b64, cs, cmask, C, ACC)
    m2 = _channel_row(m2_ptr, b64, cs, cmask, C, ACC)
    for t in range(TILES):
        ss = _spatial_tile(pid_s, t, TILES, BLOCK_S)
        m = cmask[:, None] & (ss < S)[None, :]
        xhat, g = _recompute(x_ptr, r_ptr, dy_ptr, b64 * sb, _offsets(cs, ss, sc, ss_, OFF64), b64 * db,
                             _offsets(cs, ss, dc, ds, OFF64), m, mu, rs, w, bb, slope, MODE, ACC)
        dx = rs[:, None] * (g * w[:, None] - m1[:, None] - xhat * m2[:, None])
        ooff = b64 * ob + _offsets(cs, ss, oc, os_, OFF64)
        tl.store(dx_ptr + ooff, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DRES:
            tl.store(dres_ptr + ooff, g.to(dres_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launchers (same names and arguments as the C++ kernels)
# ----------------------------------------------------------------------------------------------


def _per_channel(t: torch.Tensor, C: int) -> torch.Tensor:
    """(B, G) group values repeated over each group's channels: (B, C), contiguous."""
    return t.repeat_interleave(C // t.shape[1], dim=1).contiguous()


def _check(x, groups, residual, residual_mode):
    B, C, S = x.shape
    if residual is not None and not same_strides(residual, x):
        raise ValueError(f"residual must share x's strides {x.stride()}, got {residual.stride()}")
    if groups < 1 or C % groups:
        raise ValueError(f"groups must divide C={C}, got {groups}")
    if residual_mode not in (0, 1, 2):
        raise ValueError(f"residual_mode must be 0, 1 or 2, got {residual_mode}")
    return B, C, S


def norm_act_fwd(x, weight, bias, residual, y, mean, rstd, groups, slope, residual_mode, eps):
    B, C, S = _check(x, groups, residual, residual_mode)
    if (residual is None) != (residual_mode == 0):
        raise ValueError(f"residual must be given exactly when residual_mode != 0 (got mode {residual_mode})")
    acc = mean.dtype
    present = torch.ones((B, 1), dtype=torch.bool, device=x.device)
    c_mean = torch.empty((B, 1, C), dtype=acc, device=x.device)
    c_m2 = torch.empty_like(c_mean)
    moments_fwd([x], None, present, c_mean, c_m2)
    # Group statistics from the channels' (n = S, mean, m2) with Chan's formula.
    c_mean, c_m2 = c_mean.view(B, groups, C // groups), c_m2.view(B, groups, C // groups)
    torch.mean(c_mean, dim=-1, out=mean)
    dev = c_mean - mean.unsqueeze(-1)
    var = (c_m2.sum(-1) + S * (dev * dev).sum(-1)) / ((C // groups) * S)
    torch.rsqrt(var + eps, out=rstd)
    bc, bs, tiles, grid = spatial_grid(x)
    norm_act_fwd_kernel[grid](
        x, residual if residual is not None else x, y, _per_channel(mean, C), _per_channel(rstd, C), weight, bias,
        C, S, tiles, float(slope), *x.stride(), *y.stride(),
        MODE=residual_mode, BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(x.dtype), OFF64=needs_int64(x, y), num_warps=NUM_WARPS,
    )


def norm_act_bwd(x, weight, bias, residual, dy, mean, rstd, dx, dres, dweight, dbias, groups, slope, residual_mode):
    B, C, S = _check(x, groups, residual, residual_mode)
    if (residual is None) != (residual_mode != 1):
        raise ValueError(f"residual must be given exactly when residual_mode == 1 (got mode {residual_mode})")
    if dres is not None and residual_mode != 1:
        raise ValueError("dres is only written in residual_mode 1 (in mode 2 it is dy itself)")
    if dres is not None and not same_strides(dres, dx):
        raise ValueError(f"dres must share dx's strides {dx.stride()}, got {dres.stride()}")
    acc = mean.dtype
    mean_c, rstd_c = _per_channel(mean, C), _per_channel(rstd, C)
    bc, bs, tiles, grid = spatial_grid(x)
    n_progs = grid[0]
    pg = torch.empty((B, C, n_progs), dtype=acc, device=x.device)
    pgx = torch.empty_like(pg)
    common = dict(MODE=residual_mode, BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(x.dtype), num_warps=NUM_WARPS)
    r = residual if residual is not None else x
    norm_act_bwd_sums_kernel[grid](
        x, r, dy, mean_c, rstd_c, weight, bias, pg, pgx, C, S, tiles, n_progs, float(slope),
        *x.stride(), *dy.stride(), OFF64=needs_int64(x, dy), **common,
    )
    sum_g, sum_gx = pg.sum(-1), pgx.sum(-1)  # (B, C)
    torch.sum(sum_g, dim=0, out=dbias)
    torch.sum(sum_gx, dim=0, out=dweight)
    n = (C // groups) * S
    m1 = _per_channel((sum_g * weight).view(B, groups, -1).sum(-1) / n, C)
    m2 = _per_channel((sum_gx * weight).view(B, groups, -1).sum(-1) / n, C)
    norm_act_bwd_dx_kernel[grid](
        x, r, dy, dx, dres if dres is not None else dx, mean_c, rstd_c, weight, bias, m1, m2,
        C, S, tiles, float(slope), *x.stride(), *dy.stride(), *dx.stride(),
        HAS_DRES=dres is not None, OFF64=needs_int64(x, dy, dx, dres), **common,
    )
