"""Triton kernels for the Gaussian KL to a (mixture) anchor (SPEC section 3).

Rows are the (g, r) pairs of (G, R, C) views mu and logvar (any strides: channels innermost, rows
innermost, or a zero-stride broadcast logvar). The anchor has J components (nu, logtau2 of shape
(J, C), log-weights logpi of shape (J,)).

Forward: a program owns BLOCK_R rows of one group and walks the channels in blocks; the per-row,
per-component sums stay in a (BLOCK_R, J_PAD) register tile, so a row's channels may be spread over
several blocks (rows innermost) or fit one block (channels innermost) with the same code.

Backward: the gradients of a row need only its own resp and w, so programs also split the channels.
The (3, J, C) statistics are summed over a fixed chunk of rows per program in registers, written
to a per-program partial buffer and reduced by torch.sum in the launcher: no atomics, so results
are bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from .masked_fusion import _acc, _np2

MAX_COMPONENTS = 16
MAX_CHANNELS = 1024


@triton.jit
def _rows_kept(present_ptr, g, rr, R, HAS_PRESENT: tl.constexpr):
    # A dropped group gets an empty row bound (rather than an and-ed flag): nothing of it is read.
    if HAS_PRESENT:
        keep = tl.load(present_ptr + g) != 0
        return rr < tl.where(keep, R, 0)
    else:
        return rr < R


@triton.jit
def _rc(rr, cs, sr, sc, OFF64: tl.constexpr):
    # Offsets within one group (its base is a scalar added to the pointer): 32-bit unless a group
    # spans 2^31 elements, which halves the registers that addresses take.
    if OFF64:
        return rr[:, None].to(tl.int64) * sr + cs[None, :].to(tl.int64) * sc
    else:
        return rr[:, None] * sr + cs[None, :] * sc


@triton.jit
def gkl_fwd_kernel(
    mu_ptr, lv_ptr, present_ptr, nu_ptr, lt_ptr, logpi_ptr, loss_ptr, resp_ptr,
    R, C, J,
    mg, mr, mc,
    lg, lr, lc,
    HAS_PRESENT: tl.constexpr, HAS_RESP: tl.constexpr,
    J_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """loss = -logsumexp_j (logpi_j - KL_j) per row, resp = its softmax; 0 for dropped rows."""
    g = tl.program_id(1)
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    jj = tl.arange(0, J_PAD)
    jmask = jj < J
    rows = _rows_kept(present_ptr, g, rr, R, HAS_PRESENT)
    g64 = g.to(tl.int64)
    mu_g = mu_ptr + g64 * mg
    lv_g = lv_ptr + g64 * lg
    # KL_j = 0.5 * (sum_c (var + (mu - nu_j)^2) e^{-lt_j} + sum_c lt_j + sum_c (-1 - logvar)):
    # the last sum does not depend on j and is kept apart (q).
    kl = tl.zeros([BLOCK_R, J_PAD], dtype=ACC)
    q = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        m2d = rows[:, None] & cmask[None, :]
        mu = tl.load(mu_g + _rc(rr, cs, mr, mc, OFF64), mask=m2d, other=0.0).to(ACC)
        lv = tl.load(lv_g + _rc(rr, cs, lr, lc, OFF64), mask=m2d, other=0.0).to(ACC)
        var = tl.where(m2d, tl.exp(lv), 0.0)
        q += tl.sum(tl.where(m2d, -1.0 - lv, 0.0), axis=1)
        for j in range(J):
            nu = tl.load(nu_ptr + j * C + cs, mask=cmask, other=0.0).to(ACC)
            lt = tl.load(lt_ptr + j * C + cs, mask=cmask, other=0.0).to(ACC)
            inv = tl.where(cmask, tl.exp(-lt), 0.0)
            d = mu - nu[None, :]
            part = tl.sum((var + d * d) * inv[None, :], axis=1) + tl.sum(lt, axis=0)
            kl = tl.where(jj[None, :] == j, kl + part[:, None], kl)
    logpi = tl.load(logpi_ptr + jj, mask=jmask, other=0.0).to(ACC)
    z = logpi[None, :] - 0.5 * (kl + q[:, None])
    z = tl.where(jmask[None, :], z, float("-inf"))
    # Max-shifted log-sum-exp. The max only shifts: a NaN z still reaches the sum through exp, and
    # an infinite max is replaced by 0 (all -inf gives loss +inf, as torch.logsumexp does).
    m = tl.max(z, axis=1)
    shift = tl.where(tl.abs(m) == float("inf"), 0.0, m)
    e = tl.exp(z - shift[:, None])
    s = tl.sum(e, axis=1)
    loss = -(tl.log(s) + shift)
    keep_rows = rows
    rmask = rr < R
    tl.store(loss_ptr + g64 * R + rr, tl.where(keep_rows, loss, 0.0), mask=rmask)
    if HAS_RESP:
        resp = tl.where(keep_rows[:, None], e / s[:, None], 0.0)
        roff = (g64 * R + rr[:, None]) * J + jj[None, :]
        tl.store(resp_ptr + roff, resp, mask=rmask[:, None] & jmask[None, :])


@triton.jit
def gkl_bwd_kernel(
    mu_ptr, lv_ptr, present_ptr, nu_ptr, lt_ptr, resp_ptr, w_ptr, gmu_ptr, glv_ptr, partial_ptr,
    R, C, J, TILES,
    mg, mr, mc,
    lg, lr, lc,
    wg, wr,
    gmg, gmr, gmc,
    glg, glr, glc,
    HAS_PRESENT: tl.constexpr, HAS_RESP: tl.constexpr,
    NEED_GMU: tl.constexpr, NEED_GLV: tl.constexpr, NEED_STATS: tl.constexpr,
    J_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """grad_mu = w (mu A - B), grad_logvar = w (var A - 1) / 2; optional per-program partial stats."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = tl.program_id(2)
    g64 = g.to(tl.int64)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    jj = tl.arange(0, J_PAD)
    mu_g = mu_ptr + g64 * mg
    lv_g = lv_ptr + g64 * lg
    gmu_g = gmu_ptr + g64 * gmg
    glv_g = glv_ptr + g64 * glg
    s0 = tl.zeros([J_PAD, BLOCK_C], dtype=ACC)
    s1 = tl.zeros([J_PAD, BLOCK_C], dtype=ACC)
    s2 = tl.zeros([J_PAD, BLOCK_C], dtype=ACC)
    for t in range(TILES):
        rr = (pid_r * TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows = _rows_kept(present_ptr, g, rr, R, HAS_PRESENT)
        m2d = rows[:, None] & cmask[None, :]
        mu = tl.load(mu_g + _rc(rr, cs, mr, mc, OFF64), mask=m2d, other=0.0).to(ACC)
        lv = tl.load(lv_g + _rc(rr, cs, lr, lc, OFF64), mask=m2d, other=0.0).to(ACC)
        var = tl.exp(lv)
        # Dropped rows: w is not read (it may be garbage) and counts as 0.
        w = tl.load(w_ptr + g64 * wg + rr.to(tl.int64) * wr, mask=rows, other=0.0).to(ACC)
        A = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        Bm = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        for j in range(J):
            nu = tl.load(nu_ptr + j * C + cs, mask=cmask, other=0.0).to(ACC)
            inv = tl.exp(-tl.load(lt_ptr + j * C + cs, mask=cmask, other=0.0).to(ACC))
            if HAS_RESP:
                rj = tl.load(resp_ptr + (g64 * R + rr) * J + j, mask=rows, other=0.0).to(ACC)
            else:
                rj = tl.where(rows, 1.0, 0.0).to(ACC)
            A += rj[:, None] * inv[None, :]
            Bm += rj[:, None] * (nu * inv)[None, :]
            if NEED_STATS:
                wrj = tl.where(rows, w * rj, 0.0)
                d = mu - nu[None, :]
                sel = jj[:, None] == j
                s0 = tl.where(sel, s0 + tl.sum(wrj, axis=0), s0)
                s1 = tl.where(sel, s1 + tl.sum(wrj[:, None] * d, axis=0)[None, :], s1)
                s2 = tl.where(sel, s2 + tl.sum(wrj[:, None] * (d * d + var), axis=0)[None, :], s2)
        out_mask = (rr < R)[:, None] & cmask[None, :]
        if NEED_GMU:
            gm = tl.where(m2d, w[:, None] * (mu * A - Bm), 0.0)
            tl.store(gmu_g + _rc(rr, cs, gmr, gmc, OFF64), gm.to(gmu_ptr.dtype.element_ty), mask=out_mask)
        if NEED_GLV:
            gl = tl.where(m2d, w[:, None] * (0.5 * (var * A - 1.0)), 0.0)
            tl.store(glv_g + _rc(rr, cs, glr, glc, OFF64), gl.to(glv_ptr.dtype.element_ty), mask=out_mask)
    if NEED_STATS:
        # partial is (programs, 3, J, C), programs ordered (g, pid_r).
        prog = g64 * tl.num_programs(0) + pid_r
        base = partial_ptr + prog * 3 * J * C
        off = jj[:, None] * C + cs[None, :]
        pmask = (jj < J)[:, None] & cmask[None, :]
        tl.store(base + off, s0, mask=pmask)
        tl.store(base + J * C + off, s1, mask=pmask)
        tl.store(base + 2 * J * C + off, s2, mask=pmask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

TILE = 1024  # elements of a (BLOCK_R, BLOCK_C) tile: 4 per thread at 8 warps
NUM_WARPS = 8
# With stats, programs walk several row tiles so that the partial buffer stays small.
TARGET_PROGRAMS = 2048
MAX_TILES_PER_PROGRAM = 64


def _check(mu, nu):
    if mu.dim() != 3:
        raise ValueError(f"mu must be (G, R, C), got shape {tuple(mu.shape)}")
    J, C = nu.shape
    if not 1 <= J <= MAX_COMPONENTS:
        raise ValueError(f"between 1 and {MAX_COMPONENTS} mixture components are supported, got J={J}")
    if C > MAX_CHANNELS:
        raise ValueError(f"at most {MAX_CHANNELS} channels are supported, got C={C}")
    if mu.shape[2] != C:
        raise ValueError(f"mu has {mu.shape[2]} channels but nu has {C}")
    return J


def _blocks(mu, c_cap):
    """(BLOCK_R, BLOCK_C): long along mu's unit-stride axis for coalesced loads."""
    _, R, C = mu.shape
    if mu.stride(2) == 1 or C == 1 or mu.stride(1) != 1:
        block_c = min(_np2(C), c_cap)
        block_r = max(TILE // block_c, 1)
    else:
        block_r = 64
        block_c = min(_np2(C), TILE // block_r, c_cap)
    return min(block_r, _np2(R)), block_c


def _needs_int64(*views) -> bool:
    """Whether an offset within one group of some (G, R, C) view may not fit in 32 bits."""
    return any(
        v is not None and (v.shape[1] - 1) * v.stride(1) + (v.shape[2] - 1) * v.stride(2) >= 2**31 for v in views
    )


def gkl_fwd(mu, logvar, present, nu, logtau2, logpi, loss, resp):
    J = _check(mu, nu)
    G, R, C = mu.shape
    if G * R == 0:
        return
    block_r, block_c = _blocks(mu, 256)
    grid = (triton.cdiv(R, block_r), G)
    gkl_fwd_kernel[grid](
        mu, logvar, present if present is not None else mu, nu, logtau2, logpi, loss,
        resp if resp is not None else loss,
        R, C, J, *mu.stride(), *logvar.stride(),
        HAS_PRESENT=present is not None, HAS_RESP=resp is not None,
        J_PAD=_np2(J), BLOCK_R=block_r, BLOCK_C=block_c, ACC=_acc(mu.dtype), OFF64=_needs_int64(mu, logvar),
        num_warps=NUM_WARPS,
    )


def gkl_bwd(mu, logvar, present, nu, logtau2, resp, w, grad_mu, grad_logvar, stats):
    J = _check(mu, nu)
    if resp is None and J != 1:
        raise ValueError(f"resp may be omitted only for a single component (J == 1), got J={J}")
    G, R, C = mu.shape
    need_stats = stats is not None
    if G * R * C == 0:
        if need_stats:
            stats.zero_()
        return
    if grad_mu is None and grad_logvar is None and not need_stats:
        return
    # The (J_PAD, BLOCK_C) statistics accumulators live in registers: fewer channels per program
    # when there are many components.
    block_r, block_c = _blocks(mu, max(16, 1024 // _np2(J)) if need_stats else 256)
    n_rtiles = triton.cdiv(R, block_r)
    n_cblk = triton.cdiv(C, block_c)
    tiles = 1
    if need_stats:
        tiles = max(1, min(MAX_TILES_PER_PROGRAM, (n_rtiles * n_cblk * G) // TARGET_PROGRAMS))
    grid = (triton.cdiv(n_rtiles, tiles), n_cblk, G)
    partial = torch.empty((G * grid[0], 3, J, C) if need_stats else (1,), device=nu.device, dtype=nu.dtype)
    dummy = mu
    gm = grad_mu if grad_mu is not None else dummy
    gl = grad_logvar if grad_logvar is not None else dummy
    gkl_bwd_kernel[grid](
        mu, logvar, present if present is not None else mu, nu, logtau2, resp if resp is not None else nu, w,
        gm, gl, partial,
        R, C, J, tiles,
        *mu.stride(), *logvar.stride(), *w.stride(), *gm.stride(), *gl.stride(),
        HAS_PRESENT=present is not None, HAS_RESP=resp is not None,
        NEED_GMU=grad_mu is not None, NEED_GLV=grad_logvar is not None, NEED_STATS=need_stats,
        J_PAD=_np2(J), BLOCK_R=block_r, BLOCK_C=block_c, ACC=_acc(mu.dtype),
        OFF64=_needs_int64(mu, logvar, grad_mu, grad_logvar), num_warps=NUM_WARPS,
    )
    if need_stats:
        torch.sum(partial, dim=0, out=stats)
