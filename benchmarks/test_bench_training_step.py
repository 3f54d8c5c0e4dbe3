"""One training step of the SLS framework with the MedMAP alignment: fused vs eager vs torch.compile, in one process.

The step is the trainer's own (``Trainer._train_step``, run on a :class:`~medmap_fast.training.Trainer`
built for the purpose): gradients set to None; the framework's forward under autocast (SLSNet: one
encoder per modality, masked mean fusion of the present modalities at every level, the decoder with
deep supervision; the loss is soft Dice + BCE of the WT/TC/ET regions on every decoder level, weights
2^-level, plus 0.1 x the KL alignment of the present modalities' bottleneck features to the learned
anchor); backward; gradient clipping at norm 12 and the finite check (one read-back); AdamW; the
learning-rate schedule; the logged training Dice and modality gap.

* fused: ``fused=True``, the medmap_fast blocks and ops;
* eager: ``fused=False``, plain torch.nn blocks and the reference ops;
* compiled: ``fused=False`` with ``compile=True``, the trainer's torch.compile of the networks.

Every variant starts from the same weights (the seed, then one state_dict loaded into all) and takes
the same batch each step: B=2 patches of size^3, intensities N(0, 1), a nested tumour label (edema,
core, enhancing) at the centre, every modality on disk, and per-sample training masks (sample 0
without T1ce, sample 1 T2 and FLAIR only). The first step's loss is recorded and checked to agree
between the variants.

Sizes: CPU at 64^3 with the small model (8 base channels, 4 levels, at most 64 channels), float32, and
bfloat16 autocast where the CPU computes bf16 natively (elsewhere oneDNN emulates it, many times slower
than float32: skipped unless MEDMAP_FAST_BENCH_CPU_BF16=1); CUDA at 128^3 with the default model (32
base channels, 5 levels), bfloat16 autocast as training runs there. MEDMAP_FAST_BENCH_SIZE sets the
patch (16 in CI: seconds per variant, plus the compilation of the compiled one, which on a 2-core CPU
took about 2 minutes with an empty inductor cache and 15 s with a warm one).

Timing: 1 step before pytest-benchmark's own warm-up (1 step; 3 for compiled, whose first calls
compile), then 7 rounds on the CPU (3 for emulated bf16), 10 on a GPU; medians are reported. Peak
memory: the high-water mark of one more step above the state before it (weights, AdamW state, the
batch; gradients set to None first): CUDA's allocator peak; on the CPU every allocation and free of
torch's allocator as torch.profiler records them, kernels' scratch included, compiled code included
(see ``_timing.step_peak_memory``).

    pytest benchmarks/test_bench_training_step.py --benchmark-only     # table at the end
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from medmap_fast import _bench
from medmap_fast.training import TrainConfig
from medmap_fast.training.trainer import Trainer, cpu_has_native_bf16

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/_timing.py, beside this file)

VARIANTS = ("fused", "eager", "compiled")
AMPS = ("fp32", "bf16")
BATCH = 2
# the first step's loss of two variants from the same weights and batch: float32 sums in another
# order, or bfloat16 autocast
LOSS_RTOL = {"fp32": 1e-3, "bf16": 5e-2}


def model_settings(device: torch.device) -> dict:
    """The model: small on the CPU (TrainConfig.small's), the default on a GPU."""
    if device.type == "cuda":
        return dict(base_channels=32, depth=5, max_channels=320)
    return dict(base_channels=8, depth=4, max_channels=64)


def model_name(device: torch.device) -> str:
    m = model_settings(device)
    return f"{m['base_channels']}-{m['max_channels']} ch, {m['depth']} levels"


def skip_reason(device: torch.device, size: int, amp: str) -> Optional[str]:
    """Why this (device, size, amp) is not run, or None."""
    factor = 2 ** (model_settings(device)["depth"] - 1)
    if size % factor:
        return f"size {size} is not a multiple of {factor}, which the model's {factor}x down-sampling needs"
    if device.type == "cuda" and amp == "fp32":
        return "on CUDA the step runs under bfloat16 autocast, as training does there"
    if device.type == "cpu" and amp == "bf16" and not cpu_has_native_bf16() \
            and os.environ.get("MEDMAP_FAST_BENCH_CPU_BF16") != "1":
        return ("this CPU has no native bfloat16 (no AVX-512 BF16 / AMX): oneDNN emulates bf16 convolutions "
                "many times slower than float32; MEDMAP_FAST_BENCH_CPU_BF16=1 runs it anyway")
    return None


def write_data(root: Path) -> Path:
    """The two tiny cases a Trainer needs to start (one to train on, one to validate); never read by a step."""
    from medmap_fast.data.synth import write_synthetic_dataset

    data = Path(root) / "cases"
    if not data.exists():
        write_synthetic_dataset(data, 2, seed=0, shape=(16, 16, 16), anatomy="geometric", orientation="RAS")
    return data


def make_config(variant: str, device: torch.device, size: int, amp: str, data: Path, batch: int = BATCH
                ) -> TrainConfig:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return TrainConfig(
        data=str(data), val_cases=1, patch_size=(size, size, size), batch_size=batch, cache=False, num_workers=0,
        framework="sls", fused=variant == "fused", compile=variant == "compiled",
        amp={"fp32": "none", "bf16": "bf16"}[amp], device=device.type, seed=0,
        epochs=1, iterations_per_epoch=1000,  # the poly schedule stays far from lr 0
        lr=3e-3 if device.type == "cpu" else 1e-3,  # TrainConfig.small's on the CPU, the default on a GPU
        **model_settings(device),
    )


def make_batch(size: int, batch: int = BATCH, device: Optional[torch.device] = None) -> Dict[str, object]:
    """A batch as the training loader gives it (CPU tensors; pinned where the trainer pins them)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 4, size, size, size, generator=g)
    r = torch.linspace(-1, 1, size)
    dist = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
    label = torch.zeros(size, size, size, dtype=torch.uint8)
    label[dist < 0.5] = 2  # edema
    label[dist < 0.3] = 1  # necrotic core
    label[(dist > 0.2) & (dist < 0.3)] = 4  # enhancing rim
    subsets = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)  # t1, t1ce, t2, flair
    out = dict(image=image, label=label.expand(batch, -1, -1, -1).contiguous(),
               present=torch.ones(batch, 4, dtype=torch.bool), mask=subsets[torch.arange(batch) % 2],
               name=[f"bench-{i}" for i in range(batch)])
    if device is not None and device.type == "cuda":
        out.update({k: v.pin_memory() for k, v in out.items() if isinstance(v, torch.Tensor)})
    return out


def state_bytes(trainer: Trainer, batch: Dict[str, object]) -> int:
    """Bytes held between steps: weights and buffers, AdamW's state, the batch."""
    seen, total = set(), 0
    tensors = list(trainer.framework.parameters()) + list(trainer.framework.buffers())
    tensors += [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tensors += [t for t in batch.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class Step:
    """A Trainer of one variant and the batch; ``step()`` is one training step, synchronised."""

    def __init__(self, variant: str, device: torch.device, size: int, amp: str, root: Path,
                 initial_state: Optional[dict] = None, batch: int = BATCH):
        self.variant, self.device = variant, device
        cfg = make_config(variant, device, size, amp, write_data(root), batch)
        self.trainer = Trainer(cfg, Path(root) / f"run-{variant}-{size}-{amp}", quiet=True)
        if initial_state is not None:
            self.trainer.framework.load_state_dict(initial_state)
        self.batch = make_batch(size, batch, device)

    def initial_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.trainer.framework.state_dict().items()}

    def step(self) -> dict:
        row = self.trainer._train_step(self.batch)
        _bench.synchronize(self.device)
        return row

    def zero_grad(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)

    def peak_memory(self) -> int:
        return _timing.step_peak_memory(self.step, self.device, before=self.zero_grad)

    def close(self) -> None:
        """Release the weights, states and compiled code of this variant before the next one is built."""
        self.trainer = None
        self.batch = None


def rounds(device: torch.device, amp: str) -> int:
    if device.type == "cuda":
        return 10
    return 3 if amp == "bf16" and not cpu_has_native_bf16() else 7


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the profile script imports this file without pytest
    pytest = None

if pytest is not None:
    _INITIAL: Dict[tuple, dict] = {}  # (device, size): the weights every variant starts from
    _FIRST_LOSS: Dict[tuple, tuple] = {}  # (device, size, amp): (variant, loss of its first step)

    @pytest.fixture(scope="module")
    def step_root(tmp_path_factory):
        return tmp_path_factory.mktemp("training-step")

    @pytest.mark.parametrize("impl", VARIANTS)
    @pytest.mark.parametrize("amp", AMPS)
    def test_training_step(benchmark, device, size, step_root, amp, impl):
        reason = skip_reason(device, size, amp)
        if reason:
            pytest.skip(reason)
        key = (str(device), size)
        setup = Step(impl, device, size, amp, step_root, _INITIAL.get(key))
        _INITIAL.setdefault(key, setup.initial_state())
        first = setup.step()["loss"]
        ref = _FIRST_LOSS.setdefault(key + (amp,), (impl, first))
        assert math.isclose(first, ref[1], rel_tol=LOSS_RTOL[amp]), \
            f"first-step loss {first} ({impl}) differs from {ref[1]} ({ref[0]}): not the same step"

        benchmark.group = f"training step sls {size}^3 B={BATCH} {amp}"
        benchmark.extra_info.update(
            impl=impl, step="sls", amp=amp, size=size, batch=BATCH, model=model_name(device),
            params=sum(p.numel() for p in setup.trainer.framework.parameters()), first_loss=first,
            threads=torch.get_num_threads(),
        )
        benchmark.pedantic(setup.step, rounds=rounds(device, amp), iterations=1,
                           warmup_rounds=3 if impl == "compiled" else 1)
        benchmark.extra_info.update(peak_bytes=setup.peak_memory(), state_bytes=state_bytes(setup.trainer, setup.batch),
                                    load_average=os.getloadavg()[0])
        setup.close()
