"""Self-describing training checkpoints, written atomically (docs: training).

A checkpoint is one ``torch.save`` file that loads with ``weights_only=True`` (no pickled code):

    format, version        "medmap_fast.train", 1
    config                 the run's TrainConfig as JSON values
    model                  {"name": "slsnet" | "unet3d", "config": constructor arguments,
                            "state_dict": the weights of the network that predict/evaluate run}
    framework_state        every trained module of the framework (teacher, discriminator, anchor, ...)
    optimizer, scheduler, scaler
    rng                    torch (CPU and every CUDA device), numpy and Python generators
    progress               global step, epoch, best score, skipped batches, ...

It is written to a hidden temporary file beside its destination, flushed to disk, and renamed over it:
a reader sees the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..data.atomic import atomic_write

FORMAT = "medmap_fast.train"
VERSION = 1


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": _python_state(),
    }


def _python_state():
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))


def _fsynced_save(obj, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: Union[str, os.PathLike], payload: Dict[str, Any]) -> Path:
    """Write ``payload`` (see the module doc) to ``path`` atomically; refuses non-finite weights, so that
    a good checkpoint is never replaced by a poisoned one."""
    state = payload["model"]["state_dict"]
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"not writing {path}: the weights {bad[:5]} hold NaN or inf")
    payload = dict(payload, format=FORMAT, version=VERSION)
    path = Path(path)
    atomic_write(path, lambda tmp: _fsynced_save(payload, tmp))
    try:  # the rename itself reaches the disk with the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (a run folder means its ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read it as a medmap_fast training checkpoint ({e})") from e
    if not is_checkpoint(obj):
        raise ValueError(f"{path}: not a medmap_fast training checkpoint (no format {FORMAT!r})")
    return _checked(obj, path)


def _checked(obj: Dict[str, Any], path: Path) -> Dict[str, Any]:
    if obj.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {obj['version']} is newer than this medmap_fast reads ({VERSION})")
    return obj


def run_checkpoint(spec: Union[str, os.PathLike]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The checkpoint that ``--model`` means when it names a training run, as (path, contents): a run folder
    (its ``best.pt``, else ``last.pt``) or a checkpoint file; None for anything else. The file is read once
    here and the contents are handed on, not read again."""
    path = Path(spec)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name, load_checkpoint(path / name)
        return None
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # not a checkpoint of ours: the caller tries the other model formats
    if not is_checkpoint(obj):
        return None
    return path, _checked(obj, path)


def model_from_checkpoint(checkpoint: Union[str, os.PathLike, Dict[str, Any]],
                          device: Union[str, torch.device] = "cpu", fused: Optional[bool] = None) -> torch.nn.Module:
    """The inference network of a checkpoint (a path, or the contents :func:`load_checkpoint` returned),
    rebuilt from the configuration stored in it, in eval mode.

    fused: override the stored choice (the weights load into either form).
    """
    from ..models import build_model

    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    spec = ckpt["model"]
    config = dict(spec["config"])
    if fused is not None:
        config["fused"] = bool(fused)
    model = build_model(spec["name"], **config)
    model.load_state_dict(spec["state_dict"], strict=True)
    # predict and evaluate decode the logits the way the run was trained (regions or classes)
    model.medmap_output = ckpt["config"].get("output", "classes")
    return model.to(device).eval()
