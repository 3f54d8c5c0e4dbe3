"""Sliding-window inference against one full-volume pass, window placement, logits -> labels."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from medmap_fast.evaluation import importance_map, logits_to_labels, sliding_window_inference, window_positions
from medmap_fast.evaluation.inference import window_starts


class Pointwise(nn.Module):
    """1x1x1 convolutions only: every output voxel depends on that voxel alone, so windows cannot change it."""

    def __init__(self, k=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv3d(4, 8, 1)
        self.b = nn.Conv3d(8, k, 1)

    def forward(self, x, mask):
        x = x * mask[:, :, None, None, None].to(x.dtype)
        return self.b(torch.relu(self.a(x)))


class Spatial(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, k, 3, padding=1))

    def forward(self, x, mask):
        return self.net(x * mask[:, :, None, None, None].to(x.dtype))


def _inputs(shape=(19, 23, 17), B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 4, *shape, generator=g)
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]][:B])
    return image, mask


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.3])
@pytest.mark.parametrize("window", [(8, 10, 6), (32, 32, 32), (24, 9, 8)])
def test_equals_one_full_volume_pass_for_a_pointwise_model(window, overlap):
    # (32, 32, 32) is larger than the volume along every axis, (24, 9, 8) along one: padded and cropped back.
    model = Pointwise().eval()
    image, mask = _inputs()
    with torch.no_grad():
        want = model(image, mask)
    got = sliding_window_inference(model, image, mask, window=window, overlap=overlap, batch_size=8)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_uniform_weights_give_the_same_for_a_pointwise_model():
    model = Pointwise().eval()
    image, mask = _inputs((11, 13, 9), B=1)
    got = sliding_window_inference(model, image, mask, window=6, overlap=0.5, sigma_scale=None)
    torch.testing.assert_close(got, model(image, mask).detach(), atol=2e-5, rtol=2e-5)


def test_non_pointwise_model_gives_finite_logits_of_the_right_shape():
    model = Spatial().eval()
    image, mask = _inputs((21, 18, 15))
    out = sliding_window_inference(model, image, mask, window=(12, 12, 12), overlap=0.5, batch_size=4)
    assert out.shape == (2, 3, 21, 18, 15) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_one_window_equals_one_pass_and_a_small_volume_is_zero_padded_centred():
    model = Spatial().eval()
    image, mask = _inputs((10, 9, 7))
    with torch.no_grad():
        whole = model(image, mask)
        # padded to (12, 12, 12): 1 before and 1 after, 1 and 2, 2 and 3 (the odd voxel after)
        padded = model(torch.nn.functional.pad(image, (2, 3, 1, 2, 1, 1)), mask)[:, :, 1:11, 1:10, 2:9]
    torch.testing.assert_close(sliding_window_inference(model, image, mask, window=(10, 9, 7)), whole)
    torch.testing.assert_close(sliding_window_inference(model, image, mask, window=12), padded)


def test_batching_windows_does_not_change_the_result():
    model = Spatial().eval()
    image, mask = _inputs((20, 17, 13))
    ref = sliding_window_inference(model, image, mask, window=(10, 10, 10), overlap=0.5, batch_size=1)
    for bs in (2, 5, 1000):
        out = sliding_window_inference(model, image, mask, window=(10, 10, 10), overlap=0.5, batch_size=bs)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # one case at a time gives the same as both cases batched together
    one = sliding_window_inference(model, image[1:], mask[1:], window=(10, 10, 10), overlap=0.5, batch_size=3)
    torch.testing.assert_close(one, ref[1:], atol=1e-5, rtol=1e-5)


def test_each_window_gets_the_mask_of_its_own_case():
    calls = []

    def count_present(x, mask):
        calls.append(x.shape[0])
        return mask.float().sum(1)[:, None, None, None, None].expand(-1, 2, *x.shape[2:]) + 0 * x[:, :2]

    image, _ = _inputs((12, 12, 12), B=3)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]])
    out = sliding_window_inference(count_present, image, mask, window=8, overlap=0.5, batch_size=5)
    assert set(calls) - {5} and max(calls) == 5  # windows of different cases shared calls
    for b, n in enumerate((1.0, 3.0, 3.0)):
        torch.testing.assert_close(out[b], torch.full_like(out[b], n))


def test_window_starts_cover_the_axis_evenly():
    for size in range(1, 60):
        for win in (1, 4, 7, 10, 16, 40):
            for overlap in ("0", "0.25", "0.5", "0.75", "0.8", "0.9"):
                padded = max(size, win)
                starts = window_starts(padded, win, float(overlap))
                # the largest step that keeps the overlap, in exact arithmetic: 40 * (1 - 0.8) is 8, not 7
                step = max(1, math.floor(win * (1 - Fraction(overlap))))
                fewest = 1 if padded == win else -(-(padded - win) // step) + 1
                assert starts[0] == 0 and starts[-1] == padded - win
                gaps = [b - a for a, b in zip(starts, starts[1:])]
                assert all(0 < g <= step for g in gaps), (size, win, overlap, starts)
                assert len(starts) == fewest, (size, win, overlap, starts)
    assert window_starts(128, 128, 0.5) == [0]
    assert window_starts(80, 40, 0.8) == [0, 8, 16, 24, 32, 40]
    assert len(window_positions((240, 240, 155), 128, 0.5)) == 3 * 3 * 2


class WindowStart(nn.Module):
    """Logits constant over each window: the window's start corner, read from a coordinate image."""

    def forward(self, x, mask):
        corner = x[:, :3].amin(dim=(2, 3, 4))  # channels 0-2 hold the voxel's own coordinates
        return corner[:, :, None, None, None].expand(-1, -1, *x.shape[2:]).contiguous()


@pytest.mark.parametrize("sigma_scale", [0.125, 0.3, None])
def test_blending_is_the_gaussian_weighted_mean_over_the_windows(sigma_scale):
    """Near the borders too: each voxel gets the mean of the windows covering it, weighted by its
    Gaussian weight in each, so every window must be where it should and weighted as it should."""
    shape, win, overlap = (13, 9, 7), (6, 5, 7), 0.5
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    image = torch.cat([coords, torch.zeros(1, *shape)])[None]
    out = sliding_window_inference(WindowStart(), image, torch.ones(1, 4, dtype=torch.bool), window=win,
                                   overlap=overlap, sigma_scale=sigma_scale, batch_size=4)
    # expected, voxel by voxel, from the windows the definition asks for: the fewest starts at most
    # 6 * 0.5 = 3 voxels apart over 0..7 on axis 0, spread evenly (round(7 i / 3)); at most floor(5 * 0.5)
    # = 2 apart over 0..4 on axis 1; and one window on axis 2
    starts = [[0, 2, 5, 7], [0, 2, 4], [0]]
    assert window_positions(shape, win, overlap) == [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]

    def gauss(i, w):
        return 1.0 if sigma_scale is None else math.exp(-0.5 * ((i - (w - 1) / 2) / (sigma_scale * w)) ** 2)

    want = torch.zeros(3, *shape, dtype=torch.float64)
    total = torch.zeros(shape, dtype=torch.float64)
    for a in starts[0]:
        for b in starts[1]:
            for z in range(a, a + win[0]):
                for y in range(b, b + win[1]):
                    for x in range(shape[2]):
                        g = gauss(z - a, win[0]) * gauss(y - b, win[1]) * gauss(x, win[2])
                        want[:, z, y, x] += g * torch.tensor([a, b, 0.0], dtype=torch.float64)
                        total[z, y, x] += g
    torch.testing.assert_close(out[0], (want / total).float(), atol=1e-5, rtol=1e-5)


def test_importance_map():
    w = importance_map((9, 8, 5), 0.125)
    assert w.shape == (9, 8, 5) and w.dtype == torch.float32
    assert w.max().item() == pytest.approx(1.0, abs=1e-6) and (w > 0).all()
    # a Gaussian of std 0.125 * window per axis about the window's centre, (n - 1) / 2, scaled to a peak of 1
    axes = [torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / (0.125 * n)) ** 2)
            for n in (9, 8, 5)]
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2]
    torch.testing.assert_close(w, (g / g.max()).float())
    # far tails keep a tiny positive weight, so that a voxel that only one window's edge covers still gets a value
    far = importance_map(64, 0.01)
    assert far.min() > 0 and far.min() < 1e-10
    assert (importance_map(6, None) == 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stays_close_to_fp32_and_returns_fp32(dtype):
    model = Spatial().eval()
    image, mask = _inputs((12, 12, 12))
    ref = sliding_window_inference(model, image, mask, window=8, overlap=0.5)
    out = sliding_window_inference(model, image, mask, window=8, overlap=0.5, autocast=dtype)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_model_training_mode_is_left_alone():
    model = Pointwise().train()
    image, mask = _inputs((8, 8, 8), B=1)
    sliding_window_inference(model, image, mask, window=8)
    assert model.training
    assert not any(p.grad is not None for p in model.parameters())


def test_bad_arguments_raise_errors_that_name_them():
    model = Pointwise()
    image, mask = _inputs((8, 8, 8))
    with pytest.raises(ValueError, match=r"window must be an int or 3 positive ints"):
        sliding_window_inference(model, image, mask, window=(8, 0, 8))
    with pytest.raises(ValueError, match=r"window must be an int or 3 positive ints"):
        sliding_window_inference(model, image, mask, window=(8, 8))
    with pytest.raises(ValueError, match=r"overlap must be a number in \[0, 1\)"):
        sliding_window_inference(model, image, mask, window=8, overlap=1.0)
    with pytest.raises(ValueError, match=r"overlap must be a number in \[0, 1\)"):
        sliding_window_inference(model, image, mask, window=8, overlap=-0.1)
    with pytest.raises(ValueError, match=r"image must be \(B, M, D, H, W\), got a 4-D tensor"):
        sliding_window_inference(model, image[0], mask, window=8)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, M\) = \(2, 4\)"):
        sliding_window_inference(model, image, mask[:1], window=8)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        sliding_window_inference(model, image, mask, window=8, batch_size=0)
    with pytest.raises(ValueError, match="autocast must be None, torch.float16 or torch.bfloat16"):
        sliding_window_inference(model, image, mask, window=8, autocast=torch.float32)
    with pytest.raises(ValueError, match="sigma_scale must be a positive number or None"):
        sliding_window_inference(model, image, mask, window=8, sigma_scale=-1.0)
    with pytest.raises(ValueError, match=r"model output must be logits of shape \(2, K, 8, 8, 8\)"):
        sliding_window_inference(lambda x, m: x[:, :, :4], image, mask, window=8)
    with pytest.raises(TypeError, match="model output must be floating point"):
        sliding_window_inference(lambda x, m: (x > 0).long(), image, mask, window=8)


def test_logits_to_labels_classes():
    logits = torch.zeros(1, 4, 2, 2, 1)
    # voxel (i, j): winner channel i * 2 + j -> labels 0, 1, 2, 4
    for c in range(4):
        logits[0, c, c // 2, c % 2, 0] = 5.0
    labels = logits_to_labels(logits, "classes")
    assert labels.dtype == torch.uint8 and labels.shape == (1, 2, 2, 1)
    assert labels[0, :, :, 0].tolist() == [[0, 1], [2, 4]]
    with pytest.raises(ValueError, match=r"output='classes' needs K = 4"):
        logits_to_labels(torch.zeros(1, 3, 2, 2, 2), "classes")


def test_logits_to_labels_nested_regions():
    on, off = 3.0, -3.0
    cases = {  # (WT, TC, ET) -> label: the most specific region that is on wins
        (off, off, off): 0,
        (on, off, off): 2,
        (on, on, off): 1,
        (on, on, on): 4,
        (off, off, on): 4,
        (off, on, off): 1,
    }
    logits = torch.tensor(list(cases)).T.reshape(1, 3, len(cases), 1, 1)
    assert logits_to_labels(logits, "regions")[0, :, 0, 0].tolist() == list(cases.values())
    # threshold on the sigmoid: 0.8 in logit units is log(4) = 1.386
    near = torch.tensor([1.0, 1.5]).reshape(1, 1, 2, 1, 1).expand(1, 3, 2, 1, 1)
    assert logits_to_labels(near, "regions", threshold=0.8)[0, :, 0, 0].tolist() == [0, 4]
    assert logits_to_labels(near, "regions")[0, :, 0, 0].tolist() == [4, 4]
    with pytest.raises(ValueError, match=r"output='regions' needs K = 3"):
        logits_to_labels(torch.zeros(1, 4, 2, 2, 2), "regions")
    with pytest.raises(ValueError, match="output must be one of"):
        logits_to_labels(torch.zeros(1, 3, 2, 2, 2), "softmax")
    bad = torch.zeros(1, 3, 2, 2, 2)
    bad[0, 1, 1, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite value \(nan\) at index \(0, 1, 1, 0, 1\)"):
        logits_to_labels(bad, "regions")
