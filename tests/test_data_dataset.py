"""BraTSDataset, its cache (written atomically), make_loader with worker processes, and whole normalised cases."""

import itertools
import os
import shutil

import numpy as np
import pytest
import torch

from medmap_fast.data import (BraTSDataset, atomic_dir, find_cases, iter_cases, load_case, load_segmentation,
                              make_loader, normalize, save_segmentation)
from medmap_fast.data import synth
from medmap_fast.data.transforms import extract

SHAPE = (28, 32, 24)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    # seed 4 with missing_prob 0.5: some cases lack a modality file
    synth.write_synthetic_dataset(out, 4, seed=4, shape=SHAPE, missing_prob=0.5)
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_items(root):
    ds = BraTSDataset(root, patch_size=16, seed=0)
    assert len(ds) == 4
    cases = {c.name: c for c in map(lambda p: load_case(p, allow_missing=True), find_cases(root))}
    assert not all(c.present.all() for c in cases.values())  # the fixture does have missing modalities
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (4, 16, 16, 16)
        assert item["label"].dtype == torch.uint8 and item["label"].shape == (16, 16, 16)
        assert item["mask"].dtype == torch.bool and item["mask"].shape == (4,)
        case = cases[item["name"]]
        assert item["mask"].tolist() == case.present.tolist()
        assert not item["image"][~item["mask"]].any()
        assert set(item["label"].unique().tolist()) <= {0, 1, 2, 4}


def test_patch_larger_than_volume_is_padded(root):
    ds = BraTSDataset(root, patch_size=(40, 20, 30), augment=False, seed=0)
    case = load_case(ds.cases[0], allow_missing=True)
    image = normalize(case.image, case.present)
    item = ds[0]
    assert item["image"].shape == (4, 40, 20, 30) and item["label"].shape == (40, 20, 30)
    # axes 0 (28 -> 40) and 2 (24 -> 30) are padded, axis 1 (32 -> 20) cropped: the patch must be the
    # volume's window at one of the possible corners, zero outside the volume
    matches = [
        start
        for start in itertools.product(range(-12, 1), range(0, 13), range(-6, 1))
        if np.array_equal(extract(case.label, start, (40, 20, 30)), item["label"].numpy())
        and np.array_equal(extract(image, start, (40, 20, 30)), item["image"].numpy())
    ]
    assert len(matches) >= 1


def test_whole_volume_mode_and_iter_cases(root, tmp_path):
    ds = BraTSDataset(root, patch_size=None, augment=False)
    cases = list(iter_cases(root, allow_missing=True))
    assert [c.name for c in cases] == [p.name for p in find_cases(root)]
    for i, case in enumerate(cases):
        item = ds[i]
        assert case.normalized
        raw = load_case(ds.cases[i], allow_missing=True)
        np.testing.assert_array_equal(case.image, normalize(raw.image, raw.present))
        np.testing.assert_array_equal(item["image"].numpy(), case.image)
        np.testing.assert_array_equal(item["label"].numpy(), case.label)
        assert item["has_label"] and item["mask"].tolist() == case.present.tolist()
        # the geometry goes with it, for writing predictions in the original orientation
        out = save_segmentation(case.label, case.geometry, tmp_path / f"{case.name}.nii.gz")
        np.testing.assert_array_equal(load_segmentation(out, case.geometry), case.label)
    loader = make_loader(ds, num_workers=0)
    assert loader.batch_size == 1  # whole cases differ in shape: they cannot be stacked
    assert [b["name"][0] for b in loader] == [c.name for c in cases]  # in order, not shuffled


def test_unlabelled_cases(root, tmp_path):
    case_dir = tmp_path / "c"
    shutil.copytree(find_cases(root)[0], case_dir)
    next(case_dir.glob("*_seg.nii.gz")).unlink()
    with pytest.raises(ValueError, match="c has no segmentation"):
        BraTSDataset([case_dir], patch_size=8)[0]
    item = BraTSDataset([case_dir], patch_size=None, augment=False)[0]
    assert not item["has_label"] and not item["label"].any()
    assert next(iter_cases([case_dir])).label is None


def test_a_corrupt_case_leaves_the_others_alone(root, tmp_path):
    for case in find_cases(root)[:2]:
        shutil.copytree(case, tmp_path / "data" / case.name)
    bad = next((tmp_path / "data").glob("*/*_flair.nii.gz"))
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    ds = BraTSDataset(tmp_path / "data", patch_size=8, cache=tmp_path / "cache")
    index = [c.name for c in ds.cases].index(bad.parent.name)
    with pytest.raises(ValueError, match=bad.name):
        ds[index]
    assert ds[1 - index]["image"].shape == (4, 8, 8, 8)


def test_allow_missing_false(root, tmp_path):
    meta_missing = [p for p in find_cases(root) if len(list(p.glob("*.nii.gz"))) < 5]
    ds = BraTSDataset(meta_missing, patch_size=8, allow_missing=False)
    with pytest.raises(ValueError, match="missing modality"):
        ds[0]
    with pytest.raises(ValueError, match="missing modality"):
        BraTSDataset(meta_missing, patch_size=8, allow_missing=False, cache=tmp_path / "cache")[0]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_cache_entry_appears_whole_or_not_at_all(root, tmp_path, monkeypatch):
    ds = BraTSDataset(root, patch_size=8, cache=tmp_path / "cache")
    real_save = np.save

    def fail_on_label(path, array):  # the image is written, then the disk fills up
        if str(path).endswith("label.npy"):
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(np, "save", fail_on_label)
    with pytest.raises(OSError, match="disk full"):
        ds[0]
    assert list((tmp_path / "cache").iterdir()) == []  # no entry, and no half-written one hidden away
    monkeypatch.undo()
    assert ds[0]["image"].shape == (4, 8, 8, 8)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_augmentation_changes_and_seed_reproduces(root):
    a = BraTSDataset(root, patch_size=16, seed=3, foreground_prob=1.0, gamma_prob=0.5)
    b = BraTSDataset(root, patch_size=16, seed=3, foreground_prob=1.0, gamma_prob=0.5)
    c = BraTSDataset(root, patch_size=16, seed=4, foreground_prob=1.0, gamma_prob=0.5)
    first = [a[i] for i in range(4)]
    for i in range(4):
        _same(first[i], b[i])
        assert first[i]["label"].any()  # foreground_prob=1: every patch holds tumour
    assert any(not torch.equal(x["image"], c[i]["image"]) for i, x in enumerate(first))
    again = a[0]  # the generator moves on: a new sample of the same case
    assert not torch.equal(again["image"], first[0]["image"])


def test_modality_dropout(root):
    ds = BraTSDataset(root, patch_size=8, seed=0, modality_dropout=0.7)
    dropped = 0
    for _ in range(3):
        for i in range(len(ds)):
            item = ds[i]
            present = load_case(ds.cases[i], allow_missing=True, load_label=False).present
            mask = item["mask"].numpy()
            assert mask.sum() >= 1 and not (mask & ~present).any()
            assert not item["image"][~item["mask"]].any()
            dropped += int((present & ~mask).sum())
    assert dropped > 0


def test_cache(root, tmp_path):
    cache = tmp_path / "cache"
    plain = BraTSDataset(root, patch_size=12, seed=1, foreground_prob=0.5)
    cached = BraTSDataset(root, patch_size=12, seed=1, foreground_prob=0.5, cache=cache)
    for i in range(4):
        _same(plain[i], cached[i])  # the cache changes where the arrays come from, nothing else
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 4 and not [e for e in entries if e.startswith(".")]
    for i in range(4):
        _same(plain[i], cached[i])  # now read from the cache
    assert isinstance(cached.load(0)["image"], np.memmap)

    # a changed source file invalidates its case's entry (and only that one); the stale entry goes away
    src = next(cached.cases[0].glob("*_t1ce.nii.gz"), None) or next(cached.cases[0].glob("*_t1.nii.gz"))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached.load(0)
    after = sorted(p.name for p in cache.iterdir())
    assert len(after) == 4 and len(set(after) - set(entries)) == 1
    assert cached.cases[0].name in (set(after) - set(entries)).pop()

    with pytest.raises(ValueError, match="no cache"):
        plain.build_cache()
    fresh = BraTSDataset(root, patch_size=12, cache=tmp_path / "cache2")
    fresh.build_cache()
    assert len(list((tmp_path / "cache2").iterdir())) == 4


def test_loader_with_two_workers(root, tmp_path):
    def batches(seed, epochs=2):
        ds = BraTSDataset(root, patch_size=16, seed=seed, cache=tmp_path / "cache")
        loader = make_loader(ds, batch_size=2, num_workers=2)
        assert loader.persistent_workers and loader.num_workers == 2
        assert loader.pin_memory == torch.cuda.is_available()
        return [[b for b in loader] for _ in range(epochs)]

    run = batches(0)
    epoch = run[0]
    assert len(epoch) == 2
    for b in epoch:
        assert b["image"].shape == (2, 4, 16, 16, 16) and b["image"].dtype == torch.float32
        assert b["mask"].shape == (2, 4) and b["label"].shape == (2, 16, 16, 16)
    assert sorted(n for b in epoch for n in b["name"]) == sorted(p.name for p in find_cases(root))
    # seeded: the same batches again; the next epoch draws new ones
    again = batches(0)
    for x, y in zip(run, again):
        for bx, by in zip(x, y):
            _same(bx, by)
    second = {n: img for b in run[1] for n, img in zip(b["name"], b["image"])}
    assert any(not torch.equal(img, second[n]) for b in run[0] for n, img in zip(b["name"], b["image"]))
    other = batches(1, epochs=1)[0]
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(epoch, other))


def test_workers_draw_different_numbers(root):
    """Two workers given the same case must not crop and augment it the same way."""
    one = find_cases(root)[0]
    ds = BraTSDataset([one, one], patch_size=12, seed=0, foreground_prob=0.0)
    loader = make_loader(ds, batch_size=1, num_workers=2, shuffle=False, persistent_workers=False)
    a, b = list(loader)
    assert not torch.equal(a["image"], b["image"])


def test_argument_checks(root):
    with pytest.raises(ValueError, match="patch_size"):
        BraTSDataset(root, patch_size=(16, 16))
    with pytest.raises(ValueError, match="foreground_prob"):
        BraTSDataset(root, foreground_prob=1.5)
    with pytest.raises(ValueError, match=r"intensity_scale must be two numbers \(min, max\)"):
        BraTSDataset(root, intensity_scale=(0.9, 1.0, 1.1))
    with pytest.raises(FileNotFoundError, match="nope"):
        BraTSDataset([root / "nope"])
    empty = root.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no cases"):
        BraTSDataset(empty)
    ds = BraTSDataset(root, patch_size=8)
    with pytest.raises(ValueError, match="num_workers > 0"):
        make_loader(ds, num_workers=0, persistent_workers=True)


def test_atomic_dir(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("mine")
        target.mkdir()  # another process finishes the same folder first: its version stays
        (target / "a").write_text("theirs")
    assert (target / "a").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["entry"]
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["entry"]
