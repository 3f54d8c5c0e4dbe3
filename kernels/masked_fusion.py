"""Triton kernels for masked multi-modal fusion.

All three kernels see every modality as a (B, C, S) view (S = flattened voxels) with strides
(stride_b, stride_c, stride_s) shared by the M modalities. The M modalities come as separate
pointers (up to MAX_MODALITIES), because per-modality encoders produce separate tensors and stacking
them would cost a full extra read and write. A program handles one (BLOCK_C, BLOCK_S) tile of one
sample for all modalities, so each output element is written exactly once.

A missing modality is never read: its loads are masked off, so it may hold anything (NaN included)
and costs no memory traffic. Reductions (the weight gradient) go to a per-program partial buffer
that the caller sums: no atomics, so results are bitwise reproducible.
"""

import triton
import triton.language as tl

MAX_MODALITIES = 8


@triton.jit
def _pick(k: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    # k is a compile-time constant, so this folds to one pointer.
    if k == 0:
        p = p0
    elif k == 1:
        p = p1
    elif k == 2:
        p = p2
    elif k == 3:
        p = p3
    elif k == 4:
        p = p4
    elif k == 5:
        p = p5
    elif k == 6:
        p = p6
    else:
        p = p7
    return p


@triton.jit
def _tile(B, C, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    return pid_s, b, cs, ss, cs < C, ss < S


@triton.jit
def _present_mask(here, cmask, ss, S):
    # The tile mask, empty when the modality is missing. (Folding the scalar into the spatial bound
    # rather than and-ing it in keeps Triton's CPU interpreter happy.)
    return cmask[:, None] & (ss < tl.where(here, S, 0))[None, :]


@triton.jit
def fuse_sum_fwd_kernel(
    out_ptr, coef_ptr, present_ptr,
    f0, f1, f2, f3, f4, f5, f6, f7,
    B, C, S,
    sb, sc, ss_,
    ob, oc, os_,
    M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """out[b, c, s] = sum over present k of coef[b, k, c] * f_k[b, c, s]."""
    pid_s, b, cs, ss, cmask, smask = _tile(B, C, S, BLOCK_C, BLOCK_S)
    tile_mask = cmask[:, None] & smask[None, :]
    b64 = b.to(tl.int64)
    in_off = b64 * sb + cs[:, None].to(tl.int64) * sc + ss[None, :].to(tl.int64) * ss_
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for k in tl.static_range(M):
        fk = _pick(k, f0, f1, f2, f3, f4, f5, f6, f7)
        here = tl.load(present_ptr + b * M + k) != 0
        w = tl.load(coef_ptr + (b * M + k) * C + cs, mask=cmask, other=0.0).to(ACC)
        # A missing modality's coefficient is not used either: NaN * 0 would still reach the sum.
        w = tl.where(here, w, 0.0)
        x = tl.load(fk + in_off, mask=_present_mask(here, cmask, ss, S), other=0.0).to(ACC)
        acc += w[:, None] * x
    out_off = b64 * ob + cs[:, None].to(tl.int64) * oc + ss[None, :].to(tl.int64) * os_
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def fuse_sum_bwd_kernel(
    grad_ptr, coef_ptr, present_ptr, partial_ptr,
    g0, g1, g2, g3, g4, g5, g6, g7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    B, C, S, NUM_S_BLOCKS,
    gb, gc, gs,
    db, dc, ds,
    sb, sc, ss_,
    M: tl.constexpr, NEED_COEF_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """grad_f_k = present * coef[b, k, c] * grad; optionally the per-tile partial sums of f_k * grad."""
    pid_s, b, cs, ss, cmask, smask = _tile(B, C, S, BLOCK_C, BLOCK_S)
    tile_mask = cmask[:, None] & smask[None, :]
    b64 = b.to(tl.int64)
    c64 = cs[:, None].to(tl.int64)
    s64 = ss[None, :].to(tl.int64)
    g = tl.load(grad_ptr + b64 * gb + c64 * gc + s64 * gs, mask=tile_mask, other=0.0).to(ACC)
    dst_off = b64 * db + c64 * dc + s64 * ds
    for k in tl.static_range(M):
        here = tl.load(present_ptr + b * M + k) != 0
        w = tl.load(coef_ptr + (b * M + k) * C + cs, mask=cmask, other=0.0).to(ACC)
        w = tl.where(here, w, 0.0)
        gk = _pick(k, g0, g1, g2, g3, g4, g5, g6, g7)
        tl.store(gk + dst_off, (w[:, None] * g).to(gk.dtype.element_ty), mask=tile_mask)
        if NEED_COEF_GRAD:
            fk = _pick(k, f0, f1, f2, f3, f4, f5, f6, f7)
            x = tl.load(fk + b64 * sb + c64 * sc + s64 * ss_, mask=_present_mask(here, cmask, ss, S), other=0.0)
            x = x.to(ACC)
            part = tl.sum(x * g, axis=1)
            tl.store(partial_ptr + ((b * M + k) * C + cs) * NUM_S_BLOCKS + pid_s, part, mask=cmask)


@triton.jit
def masked_copy_kernel(
    present_ptr,
    s0, s1, s2, s3, s4, s5, s6, s7,
    d0, d1, d2, d3, d4, d5, d6, d7,
    B, C, S,
    sb, sc, ss_,
    db, dc, ds,
    M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dst_k = src_k where modality k is present, else 0 (src_k not read)."""
    pid_s, b, cs, ss, cmask, smask = _tile(B, C, S, BLOCK_C, BLOCK_S)
    tile_mask = cmask[:, None] & smask[None, :]
    b64 = b.to(tl.int64)
    c64 = cs[:, None].to(tl.int64)
    s64 = ss[None, :].to(tl.int64)
    src_off = b64 * sb + c64 * sc + s64 * ss_
    dst_off = b64 * db + c64 * dc + s64 * ds
    for k in tl.static_range(M):
        here = tl.load(present_ptr + b * M + k) != 0
        sk = _pick(k, s0, s1, s2, s3, s4, s5, s6, s7)
        dk = _pick(k, d0, d1, d2, d3, d4, d5, d6, d7)
        x = tl.load(sk + src_off, mask=_present_mask(here, cmask, ss, S), other=0.0)
        tl.store(dk + dst_off, x.to(dk.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# Launchers: torch tensors in, kernels out. Inputs are (B, C, S) views prepared by the op layer;
# the M modalities share one set of strides (the op layer makes sure of it).
# ----------------------------------------------------------------------------------------------

import torch  # noqa: E402

from ._strides import check_shared_strides  # noqa: E402


def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _blocks(C: int, unit_stride_channels: bool):
    """Tile shape: the unit-stride axis long (coalesced, vectorised), about 4K elements in all."""
    if unit_stride_channels:
        block_c = min(_np2(C), 128)
        block_s = max(4096 // block_c, 1)
    else:
        block_c = min(_np2(C), 4)
        block_s = 1024
    return block_c, block_s


def _pad(ptrs):
    ptrs = list(ptrs)
    return ptrs + [ptrs[0]] * (MAX_MODALITIES - len(ptrs))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_args(ref: torch.Tensor):
    B, C, S = ref.shape
    block_c, block_s = _blocks(C, ref.stride(1) == 1 and C > 1)
    grid = (triton.cdiv(S, block_s), triton.cdiv(C, block_c), B)
    return B, C, S, block_c, block_s, grid


def fuse_sum_fwd(feats, coef, present, out):
    check_shared_strides(feats, "feats")
    B, C, S, bc, bs, grid = _launch_args(feats[0])
    if B * C * S == 0:
        return
    fuse_sum_fwd_kernel[grid](
        out, coef, present, *_pad(feats), B, C, S,
        *feats[0].stride(), *out.stride(),
        M=len(feats), BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(out.dtype), num_warps=8,
    )


def fuse_sum_bwd(grad, feats, coef, present, grad_feats, grad_coef):
    check_shared_strides(feats, "feats")
    check_shared_strides(grad_feats, "grad_feats")
    B, C, S, bc, bs, grid = _launch_args(grad_feats[0])
    M = len(grad_feats)
    if B * C * S == 0:
        if grad_coef is not None:
            grad_coef.zero_()
        return
    need = grad_coef is not None
    n_sblk = grid[0]
    partial = torch.empty((B, M, C, n_sblk) if need else (1,), device=grad.device, dtype=coef.dtype)
    fuse_sum_bwd_kernel[grid](
        grad, coef, present, partial, *_pad(grad_feats), *_pad(feats), B, C, S, n_sblk,
        *grad.stride(), *grad_feats[0].stride(), *feats[0].stride(),
        M=M, NEED_COEF_GRAD=need, BLOCK_C=bc, BLOCK_S=bs, ACC=_acc(grad.dtype), num_warps=8,
    )
    if need:
        # A fixed-shape torch reduction: deterministic, unlike atomics.
        torch.sum(partial, dim=-1, out=grad_coef)


def masked_copy(src, present, dst):
    check_shared_strides(src, "src")
    check_shared_strides(dst, "dst")
    B, C, S, bc, bs, grid = _launch_args(dst[0])
    if B * C * S == 0:
        return
    masked_copy_kernel[grid](
        present, *_pad(src), *_pad(dst), B, C, S, *src[0].stride(), *dst[0].stride(),
        M=len(src), BLOCK_C=bc, BLOCK_S=bs, num_warps=8,
    )
