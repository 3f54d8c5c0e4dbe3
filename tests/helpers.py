"""Input builders and comparisons for the op tests."""

import torch

from conftest import LOWP_FLOOR, LOWP_RATIO, TOL

MASKS = {
    # (B, M) patterns: all present, one present, none present (mixed_mask below mixes them in a batch).
    "all": lambda B, M: torch.ones(B, M, dtype=torch.bool),
    "one": lambda B, M: torch.nn.functional.one_hot(torch.arange(B) % M, M).bool(),
    "none": lambda B, M: torch.zeros(B, M, dtype=torch.bool),
}


def mixed_mask(B, M, generator=None):
    """Random per-sample masks with sample 0 empty and sample 1 full (when B allows)."""
    m = torch.rand(B, M, generator=generator) < 0.5
    if B > 0:
        m[0] = False
    if B > 1:
        m[1] = True
    return m


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Return t's values in the requested memory layout (same logical tensor)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "channel_slice":
        # A channel slice of a wider tensor: strided batch, unit-stride voxels.
        B, C = t.shape[:2]
        big = torch.zeros(B, C + 3, *t.shape[2:], dtype=t.dtype, device=t.device)
        big[:, 2 : 2 + C] = t
        return big[:, 2 : 2 + C]
    if layout == "spatial_stride":
        # Every other voxel along W: spatial dims that do not collapse.
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "permuted":
        # Spatial axes stored in reverse order.
        return t.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "channel_slice", "spatial_stride", "permuted"]


def max_abs_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(name, fused, exact, naive_lowp=None, input_dtype=None):
    """fused vs the float64 result on the same input values; for fp16/bf16 inputs the error may be
    at most LOWP_RATIO x that of the naive reference run in that precision (plus a small floor)."""
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    dtype = input_dtype or fused.dtype
    if dtype in TOL:
        torch.testing.assert_close(fused.double(), exact.double(), **TOL[dtype], msg=lambda m: f"{name}: {m}")
        return
    err = max_abs_err(fused, exact)
    naive = max_abs_err(naive_lowp, exact) if naive_lowp is not None else 0.0
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    limit = LOWP_RATIO * naive + LOWP_FLOOR[dtype] * scale
    assert err <= limit, f"{name}: error {err:.3g} > {LOWP_RATIO} x naive {naive:.3g} + floor ({limit:.3g})"
