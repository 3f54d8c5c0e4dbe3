"""Training data throughput: BraTSDataset through make_loader with 2 worker processes, in cases per second.

8 synthetic cases of (1.5 * size)^3 voxels (96^3 at the CPU size 64, 24^3 in CI), patches of size^3
(tumour-biased crops, flips, intensity scale/shift and gamma), batch 2, persistent workers. One round is
one epoch (8 cases); the first epoch (worker start, cache fill) is not timed. Two sources: the .nii.gz
files decompressed for every sample, and the cache of normalised cases as memory-mapped .npy files.
"""

import gc

import pytest

from medmap_fast.data import BraTSDataset, make_loader
from medmap_fast.data.synth import write_synthetic_dataset

CASES, BATCH, WORKERS = 8, 2, 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, size):
    root = tmp_path_factory.mktemp("bench-data")
    side = max(size * 3 // 2, 16)
    write_synthetic_dataset(root / "cases", CASES, seed=0, shape=(side,) * 3)
    return root


@pytest.mark.parametrize("source", ["nifti", "npy_cache"])
def test_loader_throughput(benchmark, data_root, size, source):
    cache = data_root / "cache" if source == "npy_cache" else None
    ds = BraTSDataset(data_root / "cases", patch_size=size, augment=True, foreground_prob=0.33, gamma_prob=0.3,
                      seed=0, cache=cache)
    loader = make_loader(ds, batch_size=BATCH, num_workers=WORKERS, persistent_workers=True)

    def epoch():
        n = 0
        for batch in loader:
            n += batch["image"].shape[0]
        assert n == CASES
        return n

    epoch()  # starts the workers and fills the cache
    benchmark.group = f"data loader {size}^3 patches"
    benchmark.pedantic(epoch, rounds=5, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(impl=source, cases_per_s=CASES / median, cases=CASES, batch_size=BATCH,
                                num_workers=WORKERS, patch=[size] * 3, volume=[max(size * 3 // 2, 16)] * 3)
    loader = None  # the closure above holds the loader: release its persistent workers now
    gc.collect()
