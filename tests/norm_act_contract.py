"""The kernel-level contract of norm_act_fwd / norm_act_bwd (csrc/cpu/norm_act_cpu.h), in float64.

Written from the formulas, independently of torch's own norms, so that the kernels and the op-level
reference (medmap_fast.reference.norm_act, built on torch.nn.functional) check each other.
"""

import torch


def _grouped(t, groups):
    B, C, S = t.shape
    return t.reshape(B, groups, (C // groups) * S)


def fwd(x, weight, bias, residual, groups, slope, mode, eps):
    """(y, mean, rstd) in float64 for (B, C, S) x."""
    x = x.double()
    B, C, S = x.shape
    xg = _grouped(x, groups)
    mean = xg.mean(-1)
    var = ((xg - mean.unsqueeze(-1)) ** 2).mean(-1)
    rstd = 1.0 / torch.sqrt(var + eps)
    xhat = ((xg - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(B, C, S)
    z = xhat * weight.double()[:, None] + bias.double()[:, None]
    if mode == 1:
        z = z + residual.double()
    y = torch.where(z > 0, z, slope * z)
    if mode == 2:
        y = y + residual.double()
    return y, mean, rstd


def bwd(x, weight, bias, residual, dy, mean, rstd, groups, slope, mode):
    """(dx, dres or None, dweight, dbias) in float64."""
    x, dy = x.double(), dy.double()
    w, b = weight.double(), bias.double()
    B, C, S = x.shape
    cg = C // groups
    mean_c = mean.double().repeat_interleave(cg, 1).unsqueeze(-1)
    rstd_c = rstd.double().repeat_interleave(cg, 1).unsqueeze(-1)
    xhat = (x - mean_c) * rstd_c
    z = xhat * w[:, None] + b[:, None]
    if mode == 1:
        z = z + residual.double()
    g = dy * torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    dbias = g.sum((0, 2))
    dweight = (g * xhat).sum((0, 2))
    gw = g * w[:, None]
    m1 = _grouped(gw, groups).mean(-1).repeat_interleave(cg, 1).unsqueeze(-1)
    m2 = _grouped(gw * xhat, groups).mean(-1).repeat_interleave(cg, 1).unsqueeze(-1)
    dx = rstd_c * (gw - m1 - xhat * m2)
    dres = g if mode == 1 else None
    return dx, dres, dweight, dbias
