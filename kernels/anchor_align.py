"""Triton kernels for anchor alignment (SPEC section 2).

Every modality is a (B, C, S) view; the M modalities share one set of strides and come as separate
pointers (up to MAX_MODALITIES). The anchor a = sum_k coef[b, k, c] * f_k needs all modalities of a
voxel, so a program loads one (BLOCK_C, BLOCK_S) tile of every modality, keeps the M tiles in
registers (one variable per pointer slot; slots past M are compiled out) and derives everything from
them: each input element is read once from memory.

A program walks TILES consecutive spatial tiles of one (sample, channel block) and keeps its
per-channel sums in registers; the sums go to a per-program partial buffer that the launcher reduces
with torch.sum. No atomics, and the chunking depends only on the shapes, so results are bitwise
reproducible.
"""

import torch
import triton
import triton.language as tl

from ._strides import check_shared_strides
from .masked_fusion import MAX_MODALITIES, _acc, _np2, _pad, _pick, _present_mask


@triton.jit
def _flag(present_ptr, b, M: tl.constexpr, k: tl.constexpr):
    return tl.load(present_ptr + b * M + k) != 0


@triton.jit
def _row(ptr, b, cs, cmask, C, ROWS: tl.constexpr, k: tl.constexpr, ACC: tl.constexpr):
    """ptr[b, k, cs] of a contiguous (B, ROWS, C) tensor."""
    return tl.load(ptr + (b * ROWS + k) * C + cs, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _load(k: tl.constexpr, here, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC: tl.constexpr):
    # A missing modality gets an empty mask: never read, zeros in registers.
    fk = _pick(k, f0, f1, f2, f3, f4, f5, f6, f7) + fb
    return tl.load(fk + off, mask=_present_mask(here, cmask, ss, S), other=0.0).to(ACC)


@triton.jit
def _store_part(partial_ptr, acc, here, b, cs, cmask, C, pid_s, NUM_PROGS_S, M: tl.constexpr, k: tl.constexpr):
    """This program's sum of the tile accumulator acc into partial[b, k, c, pid_s] (0 when missing).

    Summing tile-shaped accumulators once per program, rather than reducing every tile, saves a
    block-wide reduction (and barrier) per tile and modality.
    """
    part = tl.where(here, tl.sum(acc, axis=1), 0.0)
    off = ((b * M + k) * C + cs).to(tl.int64) * NUM_PROGS_S + pid_s
    tl.store(partial_ptr + off, part, mask=cmask)


@triton.jit
def _spatial_tile(pid_s, t, TILES, BLOCK_S: tl.constexpr):
    start = (pid_s * TILES + t) * BLOCK_S
    return start + tl.arange(0, BLOCK_S)


@triton.jit
def _offsets(cs, ss, sc, ss_, OFF64: tl.constexpr):
    # Offsets within one sample (its base is a scalar added to the pointer): 32-bit unless a sample
    # spans 2^31 elements, which halves the registers that addresses take.
    if OFF64:
        return cs[:, None].to(tl.int64) * sc + ss[None, :].to(tl.int64) * ss_
    else:
        return cs[:, None] * sc + ss[None, :] * ss_


@triton.jit
def anchor_fwd_kernel(
    coef_ptr, present_ptr, partial_ptr, anchor_ptr,
    f0, f1, f2, f3, f4, f5, f6, f7,
    C, S, TILES, NUM_PROGS_S,
    sb, sc, ss_,
    ab, ac, as_,
    M: tl.constexpr, HAS_ANCHOR: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """Partial sums over this program's voxels of (f_k - a)^2 per (k, c); a written when asked."""
    pid_s = tl.program_id(0)
    b = tl.program_id(2)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b64 = b.to(tl.int64)
    fb = b64 * sb
    h0 = _flag(present_ptr, b, M, 0)
    c0 = _row(coef_ptr, b, cs, cmask, C, M, 0, ACC)
    if M > 1:
        h1 = _flag(present_ptr, b, M, 1)
        c1 = _row(coef_ptr, b, cs, cmask, C, M, 1, ACC)
    if M > 2:
        h2 = _flag(present_ptr, b, M, 2)
        c2 = _row(coef_ptr, b, cs, cmask, C, M, 2, ACC)
    if M > 3:
        h3 = _flag(present_ptr, b, M, 3)
        c3 = _row(coef_ptr, b, cs, cmask, C, M, 3, ACC)
    if M > 4:
        h4 = _flag(present_ptr, b, M, 4)
        c4 = _row(coef_ptr, b, cs, cmask, C, M, 4, ACC)
    if M > 5:
        h5 = _flag(present_ptr, b, M, 5)
        c5 = _row(coef_ptr, b, cs, cmask, C, M, 5, ACC)
    if M > 6:
        h6 = _flag(present_ptr, b, M, 6)
        c6 = _row(coef_ptr, b, cs, cmask, C, M, 6, ACC)
    if M > 7:
        h7 = _flag(present_ptr, b, M, 7)
        c7 = _row(coef_ptr, b, cs, cmask, C, M, 7, ACC)
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
        # The anchor, summed in ascending k; missing modalities load as zeros (and their coef is 0).
        x0 = _load(0, h0, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
        a = c0[:, None] * x0
        if M > 1:
            x1 = _load(1, h1, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c1[:, None] * x1
        if M > 2:
            x2 = _load(2, h2, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c2[:, None] * x2
        if M > 3:
            x3 = _load(3, h3, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c3[:, None] * x3
        if M > 4:
            x4 = _load(4, h4, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c4[:, None] * x4
        if M > 5:
            x5 = _load(5, h5, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c5[:, None] * x5
        if M > 6:
            x6 = _load(6, h6, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c6[:, None] * x6
        if M > 7:
            x7 = _load(7, h7, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c7[:, None] * x7
        q0 += (x0 - a) * (x0 - a)
        if M > 1:
            q1 += (x1 - a) * (x1 - a)
        if M > 2:
            q2 += (x2 - a) * (x2 - a)
        if M > 3:
            q3 += (x3 - a) * (x3 - a)
        if M > 4:
            q4 += (x4 - a) * (x4 - a)
        if M > 5:
            q5 += (x5 - a) * (x5 - a)
        if M > 6:
            q6 += (x6 - a) * (x6 - a)
        if M > 7:
            q7 += (x7 - a) * (x7 - a)
        if HAS_ANCHOR:
            tile_mask = cmask[:, None] & (ss < S)[None, :]
            aoff = _offsets(cs, ss, ac, as_, OFF64)
            tl.store(anchor_ptr + b64 * ab + aoff, a.to(anchor_ptr.dtype.element_ty), mask=tile_mask)
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


@triton.jit
def _bwd_slot(here, g, c, x, a, da, gp, gb, goff, tile_mask, DETACH: tl.constexpr):
    grad = 2.0 * g[:, None] * (x - a)
    if not DETACH:
        grad += c[:, None] * da
    tl.store(gp + gb + goff, tl.where(here, grad, 0.0).to(gp.dtype.element_ty), mask=tile_mask)


@triton.jit
def _da_term(g, x, a):
    return g[:, None] * (x - a)


@triton.jit
def anchor_bwd_kernel(
    coef_ptr, present_ptr, G_ptr, partial_ptr,
    f0, f1, f2, f3, f4, f5, f6, f7,
    g0, g1, g2, g3, g4, g5, g6, g7,
    C, S, TILES, NUM_PROGS_S,
    sb, sc, ss_,
    db, dc, ds,
    M: tl.constexpr, DETACH: tl.constexpr, NEED_COEF: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """grad_f_k = 2 G_k (f_k - a) + coef_k da, da = -2 sum_k G_k (f_k - a); optional partial sums of f_k da."""
    pid_s = tl.program_id(0)
    b = tl.program_id(2)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b64 = b.to(tl.int64)
    fb = b64 * sb
    gb = b64 * db
    # G of a missing modality is zeroed so that it drops out of da.
    h0 = _flag(present_ptr, b, M, 0)
    c0 = _row(coef_ptr, b, cs, cmask, C, M, 0, ACC)
    w0 = tl.where(h0, _row(G_ptr, b, cs, cmask, C, M, 0, ACC), 0.0)
    if M > 1:
        h1 = _flag(present_ptr, b, M, 1)
        c1 = _row(coef_ptr, b, cs, cmask, C, M, 1, ACC)
        w1 = tl.where(h1, _row(G_ptr, b, cs, cmask, C, M, 1, ACC), 0.0)
    if M > 2:
        h2 = _flag(present_ptr, b, M, 2)
        c2 = _row(coef_ptr, b, cs, cmask, C, M, 2, ACC)
        w2 = tl.where(h2, _row(G_ptr, b, cs, cmask, C, M, 2, ACC), 0.0)
    if M > 3:
        h3 = _flag(present_ptr, b, M, 3)
        c3 = _row(coef_ptr, b, cs, cmask, C, M, 3, ACC)
        w3 = tl.where(h3, _row(G_ptr, b, cs, cmask, C, M, 3, ACC), 0.0)
    if M > 4:
        h4 = _flag(present_ptr, b, M, 4)
        c4 = _row(coef_ptr, b, cs, cmask, C, M, 4, ACC)
        w4 = tl.where(h4, _row(G_ptr, b, cs, cmask, C, M, 4, ACC), 0.0)
    if M > 5:
        h5 = _flag(present_ptr, b, M, 5)
        c5 = _row(coef_ptr, b, cs, cmask, C, M, 5, ACC)
        w5 = tl.where(h5, _row(G_ptr, b, cs, cmask, C, M, 5, ACC), 0.0)
    if M > 6:
        h6 = _flag(present_ptr, b, M, 6)
        c6 = _row(coef_ptr, b, cs, cmask, C, M, 6, ACC)
        w6 = tl.where(h6, _row(G_ptr, b, cs, cmask, C, M, 6, ACC), 0.0)
    if M > 7:
        h7 = _flag(present_ptr, b, M, 7)
        c7 = _row(coef_ptr, b, cs, cmask, C, M, 7, ACC)
        w7 = tl.where(h7, _row(G_ptr, b, cs, cmask, C, M, 7, ACC), 0.0)
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
        a = c0[:, None] * x0
        if M > 1:
            x1 = _load(1, h1, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c1[:, None] * x1
        if M > 2:
            x2 = _load(2, h2, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c2[:, None] * x2
        if M > 3:
            x3 = _load(3, h3, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c3[:, None] * x3
        if M > 4:
            x4 = _load(4, h4, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c4[:, None] * x4
        if M > 5:
            x5 = _load(5, h5, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c5[:, None] * x5
        if M > 6:
            x6 = _load(6, h6, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c6[:, None] * x6
        if M > 7:
            x7 = _load(7, h7, f0, f1, f2, f3, f4, f5, f6, f7, fb, off, cmask, ss, S, ACC)
            a += c7[:, None] * x7
        if DETACH:
            da = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        else:
            s = _da_term(w0, x0, a)
            if M > 1:
                s += _da_term(w1, x1, a)
            if M > 2:
                s += _da_term(w2, x2, a)
            if M > 3:
                s += _da_term(w3, x3, a)
            if M > 4:
                s += _da_term(w4, x4, a)
            if M > 5:
                s += _da_term(w5, x5, a)
            if M > 6:
                s += _da_term(w6, x6, a)
            if M > 7:
                s += _da_term(w7, x7, a)
            da = -2.0 * s
        _bwd_slot(h0, w0, c0, x0, a, da, g0, gb, goff, tile_mask, DETACH)
        if NEED_COEF:
            q0 += x0 * da
        if M > 1:
            _bwd_slot(h1, w1, c1, x1, a, da, g1, gb, goff, tile_mask, DETACH)
            if NEED_COEF:
                q1 += x1 * da
        if M > 2:
            _bwd_slot(h2, w2, c2, x2, a, da, g2, gb, goff, tile_mask, DETACH)
            if NEED_COEF:
                q2 += x2 * da
        if M > 3:
            _bwd_slot(h3, w3, c3, x3, a, da, g3, gb, goff, tile_mask, DETACH)
            if NEED_COEF:
                q3 += x3 * da
        if M > 4:
            _bwd_slot(h4, w4, c4, x4, a, da, g4, gb, goff, tile_mask, DETACH)
            if NEED_COEF:
                q4 += x4 * da
        if M > 5:
            _bwd_slot(h5, w5, c5, x5, a, da, g5, gb, goff, tile_mask, DETACH)
            if NEED_COEF:
                q5 += x5 * da
        if M > 6:
            _bwd_slot(h6, w6, c6, x6, a, da, g6, gb, goff, tile_mask, DETACH)
            if NEED_COEF:
                q6 += x6 * da
        if M > 7:
            _bwd_slot(h7, w7, c7, x7, a, da, g7, gb, goff, tile_mask, DETACH)
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
# Launchers. Inputs are (B, C, S) views prepared by the op layer; the M modalities share one set
# of strides, and so do the M gradient outputs.
# ----------------------------------------------------------------------------------------------

# Elements of one modality's tile. Every modality's tile stays in registers, so this is smaller
# than masked_fusion's tiles: 4 values per thread at 8 warps (one 16-byte load of fp32).
TILE = 1024
NUM_WARPS = 8
# Spatial programs per launch beyond which a program walks several tiles (fewer partial sums).
TARGET_PROGRAMS = 4096
MAX_TILES_PER_PROGRAM = 16


def check_modalities(feats, what="feats"):
    M = len(feats)
    if not 1 <= M <= MAX_MODALITIES:
        raise ValueError(f"{what}: between 1 and {MAX_MODALITIES} modalities are supported, got {M}")
    check_shared_strides(feats, what)
    return M


def blocks(ref: torch.Tensor):
    """Tile (BLOCK_C, BLOCK_S) of a (B, C, S) view: long along its unit-stride axis (coalesced loads)."""
    _, C, S = ref.shape
    if ref.stride(1) == 1 and C > 1:
        block_c = min(_np2(C), 64)
        block_s = max(TILE // block_c, 1)
    else:
        block_s = min(1024, _np2(S))
        block_c = min(_np2(C), max(TILE // block_s, 1), 64)
    return block_c, min(block_s, _np2(S))


def needs_int64(*views) -> bool:
    """Whether an offset within one sample of some (B, C, S) view may not fit in 32 bits."""
    return any(
        v is not None and (v.shape[1] - 1) * v.stride(1) + (v.shape[2] - 1) * v.stride(2) >= 2**31 for v in views
    )


def spatial_grid(ref: torch.Tensor):
    """(block_c, block_s, tiles per program, grid). The chunking depends on the shape only."""
    B, C, S = ref.shape
    block_c, block_s = blocks(ref)
    n_tiles = triton.cdiv(S, block_s)
    n_cblk = triton.cdiv(C, block_c)
    tiles = max(1, min(MAX_TILES_PER_PROGRAM, (n_tiles * n_cblk * B) // TARGET_PROGRAMS))
    return block_c, block_s, tiles, (triton.cdiv(n_tiles, tiles), n_cblk, B)


def anchor_fwd(feats, coef, present, sq, anchor):
    M = check_modalities(feats)
    B, C, S = feats[0].shape
    if B * C == 0:
        return
    if S == 0:
        sq.zero_()
        return
    bc, bs, tiles, grid = spatial_grid(feats[0])
    partial = torch.empty((B, M, C, grid[0]), device=sq.device, dtype=sq.dtype)
    has_anchor = anchor is not None
    anchor_fwd_kernel[grid](
        coef, present, partial, anchor if has_anchor else partial, *_pad(feats),
        C, S, tiles, grid[0], *feats[0].stride(), *(anchor.stride() if has_anchor else (0, 0, 0)),
        M=M, HAS_ANCHOR=has_anchor, BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(feats[0].dtype),
        OFF64=needs_int64(feats[0], anchor), num_warps=NUM_WARPS,
    )
    # A fixed-shape torch reduction: deterministic, unlike atomics.
    torch.sum(partial, dim=-1, out=sq)


def anchor_bwd(feats, coef, present, G, detach, grad_feats, grad_coef):
    M = check_modalities(feats)
    if len(grad_feats) != M:
        raise ValueError(f"grad_feats: expected {M} tensors, got {len(grad_feats)}")
    check_shared_strides(grad_feats, "grad_feats")
    B, C, S = feats[0].shape
    if B * C == 0:
        return
    need = grad_coef is not None
    if S == 0:
        if need:
            grad_coef.zero_()
        return
    bc, bs, tiles, grid = spatial_grid(feats[0])
    partial = torch.empty((B, M, C, grid[0]) if need else (1,), device=G.device, dtype=G.dtype)
    anchor_bwd_kernel[grid](
        coef, present, G, partial, *_pad(feats), *_pad(grad_feats),
        C, S, tiles, grid[0], *feats[0].stride(), *grad_feats[0].stride(),
        M=M, DETACH=bool(detach), NEED_COEF=need,
        BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(feats[0].dtype), OFF64=needs_int64(feats[0], grad_feats[0]),
        num_warps=NUM_WARPS,
    )
    if need:
        torch.sum(partial, dim=-1, out=grad_coef)
