"""Float64 reference of the alignment kernels' contract (csrc/cpu/alignment_cpu.h), kernel by kernel.

The op tests check the public ops end to end; these functions let the kernel tests check each backend's
kernels directly, on exactly the (B, C, S) views, coefficients and per-row tensors the ops pass them.
Every function takes and returns float64 tensors and mirrors one kernel's arguments.
"""

import torch


def _stack(feats, present):
    f = torch.stack([x.double() for x in feats], 1)  # (B, M, C, S)
    p = present.view(*present.shape, 1, 1)
    return torch.where(p, f, torch.zeros((), dtype=f.dtype))


def _anchor(f, coef):
    return (coef.double().unsqueeze(-1) * f).sum(1)  # (B, C, S)


def anchor_fwd(feats, coef, present):
    """-> (sq (B, M, C), anchor (B, C, S))."""
    f = _stack(feats, present)
    a = _anchor(f, coef)
    r = f - a.unsqueeze(1)
    sq = (r * r).sum(-1) * present.unsqueeze(-1)
    return sq, a


def anchor_bwd(feats, coef, present, G, detach):
    """-> (grad_feats list of (B, C, S), grad_coef (B, M, C))."""
    f = _stack(feats, present)
    a = _anchor(f, coef)
    r = f - a.unsqueeze(1)
    p = present.view(*present.shape, 1, 1)
    Gd = G.double().unsqueeze(-1) * p
    da = torch.zeros_like(a) if detach else -2 * (Gd * r).sum(1)
    gf = (2 * Gd * r + coef.double().unsqueeze(-1) * da.unsqueeze(1)) * p
    gc = (f * da.unsqueeze(1)).sum(-1) * present.unsqueeze(-1)
    return list(gf.unbind(1)), gc


def moments_fwd(feats, coef, present):
    """-> (mean, m2), each (B, M + A, C) with A = 1 when coef is given."""
    f = _stack(feats, present)
    if coef is not None:
        f = torch.cat([f, _anchor(f, coef).unsqueeze(1)], 1)
    mean = f.mean(-1)
    m2 = ((f - mean.unsqueeze(-1)) ** 2).sum(-1)
    M = present.shape[1]
    keep = torch.ones(f.shape[:2], dtype=torch.bool)
    keep[:, :M] = present
    return mean * keep.unsqueeze(-1), m2 * keep.unsqueeze(-1)


def moments_bwd(feats, coef, present, mean, alpha, beta):
    """-> (grad_feats list, grad_coef (B, M, C) or None)."""
    f = _stack(feats, present)
    M = present.shape[1]
    p = present.view(*present.shape, 1, 1)
    mean, alpha, beta = mean.double(), alpha.double(), beta.double()
    gf = alpha[:, :M, :, None] + beta[:, :M, :, None] * (f - mean[:, :M, :, None])
    gc = None
    if coef is not None:
        a = _anchor(f, coef)
        da = alpha[:, M, :, None] + beta[:, M, :, None] * (a - mean[:, M, :, None])
        gf = gf + coef.double().unsqueeze(-1) * da.unsqueeze(1)
        gc = (f * da.unsqueeze(1)).sum(-1) * present.unsqueeze(-1)
    return list((gf * p).unbind(1)), gc


def _kl_terms(mu, logvar, nu, logtau2, logpi):
    mu, lv = mu.double(), logvar.double().expand(mu.shape)
    var = lv.exp()
    nu, lt, logpi = nu.double(), logtau2.double(), logpi.double()
    diff = mu.unsqueeze(-2) - nu  # (G, R, J, C)
    kl = 0.5 * ((var.unsqueeze(-2) + diff * diff) * torch.exp(-lt) - 1 - lv.unsqueeze(-2) + lt).sum(-1)
    z = logpi - kl  # (G, R, J)
    return mu, var, diff, z


def _keep(present, G, R):
    if present is None:
        return torch.ones(G, R, dtype=torch.bool)
    return present.view(-1, 1).expand(G, R)


def gkl_fwd(mu, logvar, present, nu, logtau2, logpi):
    """-> (loss (G, R), resp (G, R, J))."""
    _, _, _, z = _kl_terms(mu, logvar, nu, logtau2, logpi)
    keep = _keep(present, *mu.shape[:2])
    loss = torch.where(keep, -torch.logsumexp(z, -1), torch.zeros((), dtype=torch.float64))
    resp = torch.where(keep.unsqueeze(-1), z.softmax(-1), torch.zeros((), dtype=torch.float64))
    return loss, resp


def gkl_bwd(mu, logvar, present, nu, logtau2, resp, w):
    """-> (grad_mu, grad_logvar, stats (3, J, C)); resp None means J == 1."""
    G, R, C = mu.shape
    J = nu.shape[0]
    keep = _keep(present, G, R)
    # Dropped rows may hold anything (NaN included): select them away before any arithmetic.
    zero = torch.zeros((), dtype=torch.float64)
    mu = torch.where(keep.unsqueeze(-1), mu.double(), zero)
    logvar = torch.where(keep.unsqueeze(-1), logvar.double().expand(G, R, C), zero)
    mu64, var, diff, _ = _kl_terms(mu, logvar, nu, logtau2, torch.zeros(nu.shape[0], dtype=torch.float64))
    r = torch.ones(G, R, 1, dtype=torch.float64) if resp is None else resp.double()
    r = r * keep.unsqueeze(-1)
    w = w.double().expand(G, R) * keep
    inv = torch.exp(-logtau2.double())  # (J, C)
    A = (r.unsqueeze(-1) * inv).sum(-2)  # (G, R, C)
    Bc = (r.unsqueeze(-1) * nu.double() * inv).sum(-2)
    grad_mu = w.unsqueeze(-1) * (mu64 * A - Bc)
    grad_lv = w.unsqueeze(-1) * 0.5 * (var * A - 1)
    wr = (w.unsqueeze(-1) * r).unsqueeze(-1)  # (G, R, J, 1)
    stats = torch.stack(
        [
            wr.expand(G, R, J, C).sum((0, 1)),
            (wr * diff).sum((0, 1)),
            (wr * (diff * diff + var.unsqueeze(-2))).sum((0, 1)),
        ]
    )
    return grad_mu, grad_lv, stats
