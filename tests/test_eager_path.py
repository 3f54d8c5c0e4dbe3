"""The per-call shortcuts of the ops give exactly what the slower paths they replace give.

* ``medmap_fast.ops._eager.call`` runs a custom op's implementation and autograd formula directly in
  plain eager mode; under a dispatch mode (as under torch.compile, FakeTensor, ...) it goes through
  torch.library. Both must give the same bits, forward and backward.
* ``_checks.check_anchor_weights`` tests CPU weights in Python; the torch version must accept and
  refuse the same weights, with the same message.
* ``gaussian_kl._grouped`` predicts from the strides when ``view`` would fail; it must never refuse a
  view that ``view`` allows.
"""

import math
import random
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medmap_fast
from medmap_fast import _checks

from conftest import fresh_seed


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing but makes ``_eager.call`` take the torch.library path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _cases(g):
    B, M, C, S = 2, 3, 5, (3, 4, 2)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).requires_grad_()

    feats = [leaf(B, C, *S) for _ in range(M)]
    theta = leaf(M, scale=0.3)
    w = leaf(B, M)
    x, r = leaf(B, C, *S), leaf(B, C, *S)
    wt, bs = leaf(C), leaf(C)
    mu, lv = leaf(B, M, C, *S), leaf(B, M, C, *S, scale=0.3)
    nu, lt, pl = leaf(4, C), leaf(4, C, scale=0.3), leaf(4)
    rows = lambda t: t.movedim(2, -1)  # noqa: E731
    return [
        ("mean", lambda: medmap_fast.masked_fusion(feats, mask, "mean"), feats),
        ("weighted", lambda: medmap_fast.masked_fusion(feats, mask, "weighted", w, normalize=True), feats + [w]),
        ("zero_concat", lambda: medmap_fast.masked_fusion(feats, mask, "zero_concat"), feats),
        ("anchor_impute", lambda: medmap_fast.masked_fusion(feats, mask, "anchor_impute", theta.softmax(0)),
         feats + [theta]),
        ("anchor_align", lambda: medmap_fast.anchor_align(feats, mask, theta.softmax(0), reduction="none"),
         feats + [theta]),
        ("anchor_align+anchor", lambda: medmap_fast.anchor_align(feats, mask, theta.softmax(0), return_anchor=True)[1],
         feats + [theta]),
        ("moment_matching", lambda: medmap_fast.moment_matching(feats, mask, theta.softmax(0), reduction="none"),
         feats + [theta]),
        ("gaussian_kl", lambda: medmap_fast.gaussian_kl(rows(mu), rows(lv), mask=mask, reduction="none"), [mu, lv]),
        ("gaussian_kl mixture", lambda: medmap_fast.gaussian_kl(rows(mu), rows(lv), nu=nu, logtau2=lt, pi_logits=pl,
                                                                 reduction="none"), [mu, lv, nu, lt, pl]),
        # the C++ kernel named: left to choose, a CPU tensor this small runs on aten's ops on both paths
        ("norm_act", lambda: medmap_fast.norm_act(x, wt, bs, backend="cpu"), [x, wt, bs]),
        ("norm_act residual", lambda: medmap_fast.norm_act(x, wt, bs, residual=r, backend="cpu"), [x, wt, bs, r]),
        ("norm_act residual after", lambda: medmap_fast.norm_act(x, None, None, norm="group", num_groups=1,
                                                                  residual=r, residual_position="after_activation",
                                                                  backend="cpu"),
         [x, r]),
        ("norm_act small", lambda: medmap_fast.norm_act(x, wt, bs, residual=r), [x, wt, bs, r]),
    ]


def _run(fn, leaves, g_seed):
    out = fn()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(g_seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    with torch.no_grad():
        out_ng = fn()
    return out.detach(), grads, out_ng


def test_direct_path_matches_torch_library_path():
    seed = fresh_seed()
    for name, fn, leaves in _cases(torch.Generator().manual_seed(seed)):
        fast = _run(fn, leaves, seed)
        with _PassThrough():
            slow = _run(fn, leaves, seed)
        assert torch.equal(fast[0], slow[0]), name
        assert torch.equal(fast[2], slow[2]), name
        for a, b in zip(fast[1], slow[1]):
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.equal(a, b), name


def test_direct_path_is_taken_in_eager_mode_only():
    feats = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(2)]
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert type(medmap_fast.masked_fusion(feats, mask).grad_fn).__name__ == "_DirectBackward"
    with _PassThrough():
        name = type(medmap_fast.masked_fusion(feats, mask).grad_fn).__name__
        assert "GeneratedBackwardFor_medmap_fast_fuse_sum" in name


def test_gradcheck_through_the_direct_path():
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: medmap_fast.norm_act(x, w, b, backend="cpu"), (x, w, b))


def _torch_check(pi, mask):
    # the torch version alone: the host test says "not decided here"
    orig = _checks._anchor_weights_pass_on_host
    _checks._anchor_weights_pass_on_host = lambda p, m: False
    try:
        _checks.check_anchor_weights(pi, mask)
    finally:
        _checks._anchor_weights_pass_on_host = orig


def _outcome(check, pi, mask):
    try:
        check(pi, mask)
    except (ValueError, RuntimeError) as e:
        return type(e).__name__ + ": " + str(e)
    return None


def test_host_anchor_weight_check_agrees_with_torch():
    rnd = random.Random(fresh_seed())
    values = [0.0, 0.0, 0.5, 1.0, 2.0, -1.0, float("nan"), float("inf"), 1e-30]
    refused = 0
    for _ in range(600):
        B, M = rnd.randint(0, 3), rnd.randint(1, 4)
        mask = torch.tensor([[rnd.random() < 0.6 for _ in range(M)] for _ in range(B)], dtype=torch.bool).view(B, M)
        if rnd.random() < 0.3:
            mask = mask.to(rnd.choice([torch.float32, torch.int64]))
        shape = (M,) if rnd.random() < 0.5 else (B, M)
        dtype = rnd.choice([torch.float32, torch.float64, torch.bfloat16])
        pi = torch.tensor([rnd.choice(values) for _ in range(math.prod(shape))], dtype=dtype).view(shape)
        fast = _outcome(_checks.check_anchor_weights, pi, mask)
        assert fast == _outcome(_torch_check, pi, mask), (pi, mask)
        refused += fast is not None
    assert refused > 50  # the random weights exercise the refusals too


def test_grouped_never_refuses_a_possible_view():
    kl = sys.modules["medmap_fast.ops.gaussian_kl"]
    rnd = random.Random(fresh_seed())
    for _ in range(500):
        nd = rnd.randint(2, 5)
        shape = [rnd.choice([0, 1, 1, 2, 3]) if rnd.random() < 0.1 else rnd.choice([1, 2, 3, 4]) for _ in range(nd)]
        base = torch.randn(*[s + rnd.randint(0, 1) for s in shape])
        t = base[tuple(slice(0, s) for s in shape)]
        perm = list(range(nd))
        rnd.shuffle(perm)
        t = t.permute(*perm)
        lead = t.shape[:-1]
        for split in range(t.dim()):
            try:
                expected = t.view(math.prod(lead[:split]), math.prod(lead[split:]), t.shape[-1])
            except RuntimeError:
                expected = None
            got = kl._grouped(t, split)
            assert (got is None) == (expected is None), (t.shape, t.stride(), split)
            if got is not None:
                assert got.stride() == expected.stride() and got.data_ptr() == expected.data_ptr()


@pytest.mark.parametrize("op", ["anchor_align", "moment_matching"])
def test_refused_weights_raise_the_same_error_on_both_paths(op):
    feats = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    pi = torch.tensor([1.0, 0.0, 0.0])
    fn = getattr(medmap_fast, op)
    with pytest.raises(ValueError) as fast:
        fn(feats, mask, pi)
    orig = _checks._anchor_weights_pass_on_host
    _checks._anchor_weights_pass_on_host = lambda p, m: False
    try:
        with pytest.raises(ValueError) as slow:
            fn(feats, mask, pi)
    finally:
        _checks._anchor_weights_pass_on_host = orig
    assert str(fast.value) == str(slow.value)
    assert "sum to 0 in sample(s) [1]" in str(fast.value)
