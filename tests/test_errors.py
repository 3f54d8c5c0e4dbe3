"""Bad input gives a clear exception naming the argument, what it got and what it expects."""

import pytest
import torch

import medmap_fast


def _feats(M=3, B=2, C=4, dtype=torch.float32):
    return [torch.randn(B, C, 3, 4, 5, dtype=dtype) for _ in range(M)]


@pytest.mark.parametrize(
    "features,mask,kwargs,exc,words",
    [
        (lambda: torch.randn(2, 3, 4), lambda: torch.ones(2, 3), {}, ValueError, ["features", "(B, M, C, *spatial)", "3-D"]),
        (lambda: [], lambda: torch.ones(2, 0), {}, ValueError, ["features", "empty list"]),
        (lambda: "abc", lambda: torch.ones(2, 3), {}, TypeError, ["features", "str"]),
        (lambda: [torch.randn(2, 4, 5)] + [torch.randn(2, 4)], lambda: torch.ones(2, 2), {}, ValueError, ["features[1]", "(B, C, *spatial)"]),
        (lambda: _feats(2) + [torch.randn(2, 4, 3, 4, 6)], lambda: torch.ones(2, 3), {}, ValueError, ["features[2]", "same shape"]),
        (lambda: _feats(2) + [torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)], lambda: torch.ones(2, 3), {}, TypeError, ["features[2]", "float64"]),
        (lambda: [torch.ones(2, 4, 3, 4, 5, dtype=torch.int32)] * 2, lambda: torch.ones(2, 2), {}, TypeError, ["features[0]", "int32"]),
        (lambda: _feats(), lambda: torch.ones(2, 4), {}, ValueError, ["mask", "(2, 3)", "(2, 4)"]),
        (lambda: _feats(), lambda: torch.ones(3, 3), {}, ValueError, ["mask", "(2, 3)"]),
        (lambda: _feats(), lambda: torch.ones(6), {}, ValueError, ["mask", "(B, M)"]),
        (lambda: _feats(), lambda: torch.full((2, 3), 2.0), {}, ValueError, ["mask", "0 and 1", "2.0"]),
        (lambda: _feats(), lambda: [[1, 1, 1], [1, 1, 1]], {}, TypeError, ["mask", "list"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "max"}, ValueError, ["mode", "'max'"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "weighted"}, ValueError, ["weights", "None"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "weighted", "weights": torch.ones(2, 4)}, ValueError, ["weights", "(2, 3)", "(2, 4)"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "weighted", "weights": torch.ones(2, 3, dtype=torch.long)}, TypeError, ["weights", "int64"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "mean", "weights": torch.ones(2, 3)}, ValueError, ["weights", "mode='weighted'"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"backend": "gpu"}, ValueError, ["backend", "'gpu'", "reference"]),
        # anchor weights that leave a sample with present modalities no anchor: named, not silently a = 0
        (lambda: _feats(), lambda: torch.tensor([[1, 1, 0], [0, 1, 1]]), {"mode": "anchor_impute", "weights": torch.tensor([1.0, 0.0, 0.0])},
         ValueError, ["weights:", "sum to 0 in sample(s) [1] (1 of 2)", "modalities [1, 2] present", "weights = [1.0, 0.0, 0.0]", "Expected a positive weight"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "anchor_impute", "weights": torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])},
         ValueError, ["weights:", "sample(s) [1]", "weights[1] = [0.0, 0.0, 0.0]"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "anchor_impute", "weights": torch.tensor([1.0, -1.0, 1.0])},
         ValueError, ["weights must be finite and non-negative", "-1.0", "index (1,)"]),
        (lambda: _feats(), lambda: torch.ones(2, 3), {"mode": "anchor_impute", "weights": torch.tensor([1.0, float("inf"), 1.0])},
         ValueError, ["weights must be finite and non-negative", "inf", "index (1,)"]),
    ],
)
def test_bad_input(features, mask, kwargs, exc, words):
    with pytest.raises(exc) as info:
        medmap_fast.masked_fusion(features(), mask(), **kwargs)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in message: {msg}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_device_mismatch():
    feats = [f.cuda() for f in _feats()]
    with pytest.raises(ValueError, match="mask is on cpu"):
        medmap_fast.masked_fusion(feats, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"features\[1\] is on"):
        medmap_fast.masked_fusion([feats[0], feats[1].cpu()], torch.ones(2, 2, device="cuda"))


def test_device_mismatch_meta():
    # A second device without a GPU: the meta device.
    feats = [torch.empty(2, 4, 3, 4, 5, device="meta") for _ in range(3)]
    with pytest.raises(ValueError, match="mask is on cpu but the features are on meta"):
        medmap_fast.masked_fusion(feats, torch.ones(2, 3))


def test_anchor_impute_sample_with_nothing_present_needs_no_weight():
    feats = _feats()
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = medmap_fast.masked_fusion(feats, mask, "anchor_impute", torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.isfinite(out).all() and (out[1] == 0).all()
