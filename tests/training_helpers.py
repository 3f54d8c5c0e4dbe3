"""Tiny training set-ups shared by the training tests: seconds, not minutes."""

import pytest

from medmap_fast.data.synth import write_synthetic_dataset
from medmap_fast.training import TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    """A 3-level network of 4 base channels on 16^3 patches, two steps per epoch, no workers, no cache."""
    base = dict(patch_size=(16, 16, 16), base_channels=4, depth=3, max_channels=16, batch_size=2, epochs=1,
                iterations_per_epoch=2, num_workers=0, cache=False, lr=3e-3, val_cases=1, val_subsets=False,
                val_window=(16, 16, 16), foreground_prob=0.9)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Five synthetic cases of 32^3 voxels."""
    root = tmp_path_factory.mktemp("tiny_brats") / "data"
    write_synthetic_dataset(root, 5, seed=3, shape=(32, 32, 32), anatomy="geometric", orientation="RAS")
    return root
