"""normalize and the augmentation: statistics, tumour-biased crops, padding, aligned flips."""

import numpy as np
import pytest

from medmap_fast.data import normalize
from medmap_fast.data.transforms import (crop_window, extract, modality_dropout, random_crop, random_flip,
                                         random_intensity)


def _image(shape=(24, 28, 32), seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((4,) + shape, np.float32)
    brain = np.zeros(shape, bool)
    brain[4:20, 5:22, 6:26] = True
    for k in range(4):
        img[k][brain] = rng.normal(100 * (k + 1), 10 * (k + 1), brain.sum())
    return img, brain


def test_normalize_statistics():
    img, brain = _image()
    img[3] = 0
    img[3][brain] = 7.0  # a constant brain: std 0
    present = np.array([True, False, True, True])
    out = normalize(img, present)
    assert out.dtype == np.float32 and out.shape == img.shape
    for k in (0, 2):
        v = out[k][brain]
        assert abs(v.mean()) < 1e-5 and abs(v.std() - 1) < 1e-4
        assert not out[k][~brain].any()
        np.testing.assert_allclose(v, (img[k][brain] - img[k][brain].mean()) / img[k][brain].std(), atol=1e-4)
    assert not out[1].any()  # missing modality, whatever its channel held
    assert np.isfinite(out).all() and not out[3].any()


def test_normalize_brain_is_per_modality_and_empty_is_fine():
    img, _ = _image()
    img[1][:, :, :10] = 0  # this modality's brain is smaller
    img[2] = 0
    out = normalize(img, np.ones(4, bool))
    v = out[1][img[1] != 0]
    assert abs(v.mean()) < 1e-5 and abs(v.std() - 1) < 1e-4
    assert not out[1][:, :, :10].any()
    assert not out[2].any() and np.isfinite(out).all()


def test_normalize_checks_its_input():
    img, _ = _image()
    with pytest.raises(ValueError, match="present"):
        normalize(img, np.ones(3, bool))
    with pytest.raises(ValueError, match="image"):
        normalize(img[0], np.ones(4, bool))


@pytest.mark.parametrize("shape,patch", [((30, 30, 30), (16, 16, 16)), ((10, 40, 12), (16, 16, 16))])
def test_crop_window_and_padding(shape, patch):
    rng = np.random.default_rng(0)
    vol = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    for _ in range(50):
        start = crop_window(shape, patch, rng)
        out = extract(vol[None], start, patch)[0]
        assert out.shape == patch
        for s, p, st in zip(shape, patch, start):
            assert (0 <= st <= s - p) if s >= p else (s - p <= st <= 0)
        # every voxel of the patch is the volume's voxel at start + offset, or 0 outside it
        idx = np.indices(patch).reshape(3, -1).T + np.array(start)
        inside = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        expect = np.zeros(len(idx), np.float32)
        expect[inside] = vol[tuple(idx[inside].T)]
        np.testing.assert_array_equal(out.reshape(-1), expect)


def test_crop_centres_on_the_given_voxel():
    rng = np.random.default_rng(1)
    assert crop_window((40, 40, 40), (16, 16, 16), rng, center=(20, 5, 39)) == (12, 0, 24)


def test_foreground_crops_hit_the_tumour_more_often():
    shape, patch = (64, 64, 64), (16, 16, 16)
    img = np.ones((4,) + shape, np.float32)
    label = np.zeros(shape, np.uint8)
    label[50:54, 8:12, 40:43] = 4  # small, off-centre: a uniform crop rarely finds it
    hits = {}
    for prob in (0.0, 0.5, 1.0):
        rng = np.random.default_rng(2)
        n = 0
        for _ in range(400):
            _, lab, _ = random_crop(img, label, patch, rng, foreground_prob=prob)
            n += bool(lab.any())
        hits[prob] = n / 400
    assert hits[0.0] < 0.15
    assert hits[0.5] > hits[0.0] + 0.3
    assert hits[1.0] == 1.0
    # precomputed coordinates give the same behaviour
    rng = np.random.default_rng(3)
    fg = np.argwhere(label > 0)
    assert all(random_crop(img, label, patch, rng, 1.0, fg)[1].any() for _ in range(50))


def test_crop_without_tumour_falls_back_to_uniform():
    rng = np.random.default_rng(0)
    img = np.ones((4, 20, 20, 20), np.float32)
    starts = set()
    for _ in range(40):
        out, lab, start = random_crop(img, np.zeros((20, 20, 20), np.uint8), (8, 8, 8), rng, foreground_prob=1.0)
        assert out.shape == (4, 8, 8, 8) and lab.shape == (8, 8, 8) and out.all()
        starts.add(start)
    assert len(starts) > 30 and all(0 <= a <= 12 for st in starts for a in st)


def test_flips_keep_image_and_label_aligned():
    rng = np.random.default_rng(0)
    shape = (6, 7, 8)
    label = np.random.default_rng(5).choice(np.array([0, 1, 2, 4], np.uint8), shape)
    # every channel encodes the label, so alignment is checkable after any flip
    img = np.stack([label.astype(np.float32) * (k + 1) for k in range(4)])
    seen = set()
    for _ in range(100):
        im, lab, flipped = random_flip(img, label, rng, prob=0.5)
        seen.add(tuple(flipped))
        for k in range(4):
            np.testing.assert_array_equal(im[k], lab * (k + 1.0))
        np.testing.assert_array_equal(lab, np.flip(label, axis=tuple(flipped)) if flipped else label)
    assert len(seen) == 8  # each of the 2^3 combinations occurs


def test_intensity_only_on_present_brain():
    img, brain = _image()
    img = normalize(img, np.ones(4, bool))
    present = np.array([True, True, False, True])
    out = random_intensity(img, present, np.random.default_rng(0), scale=(0.5, 2.0), shift=(-1, 1),
                           gamma_prob=1.0)
    assert not out[2].any()
    assert not out[:, ~brain].any()
    for k in (0, 1, 3):
        assert (out[k][brain] != 0).all()
        assert not np.allclose(out[k][brain], img[k][brain])
    # without gamma it is exactly affine per modality
    out = random_intensity(img, present, np.random.default_rng(1), scale=(0.5, 2.0), shift=(-1, 1))
    for k in (0, 1, 3):
        s, t = np.polyfit(img[k][brain], out[k][brain], 1)
        np.testing.assert_allclose(out[k][brain], s * img[k][brain] + t, atol=1e-4)
        assert 0.5 <= s <= 2.0 and -1 <= t <= 1


def test_gamma_keeps_order():
    img, brain = _image()
    img = normalize(img, np.ones(4, bool))
    out = random_intensity(img, np.ones(4, bool), np.random.default_rng(0), scale=(1, 1), shift=(0, 0),
                           gamma_prob=1.0, gamma=(2.0, 2.0))
    a, b = img[0][brain], out[0][brain]
    order = np.argsort(a)
    assert np.all(np.diff(b[order]) >= -1e-5)  # monotone
    assert abs(b.min() - a.min()) < 1e-4 and abs(b.max() - a.max()) < 1e-4
    assert not np.allclose(a, b)


def test_modality_dropout_keeps_one():
    rng = np.random.default_rng(0)
    present = np.array([True, False, True, True])
    counts = np.zeros(4)
    for _ in range(500):
        p = modality_dropout(present, rng, 0.9)
        assert p.sum() >= 1 and not p[1]
        counts += p
    assert counts[1] == 0 and counts[[0, 2, 3]].min() > 50
    np.testing.assert_array_equal(modality_dropout(present, rng, 0.0), present)
