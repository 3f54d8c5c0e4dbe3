"""Loading the model that ``medmap-fast predict`` and ``evaluate`` run.

``--model`` is either

* a TorchScript file (``torch.jit.save``), loaded with ``torch.jit.load``;
* a ``.pt2`` file of ``torch.export.save``, loaded with ``torch.export.load(...).module()``: export it in
  eval mode, on the device it will run on, with a dynamic batch dimension (the last call of a volume
  may get fewer windows than ``--batch-size``) or use ``--batch-size 1``; or
* a checkpoint written by ``medmap-fast train`` (``RUN/best.pt``, ``RUN/last.pt``) or its run folder
  ``RUN`` (its ``best.pt``): the model is rebuilt from the settings stored in the checkpoint; or
* a ``package.module:callable`` spec (``callable`` may be dotted, e.g. ``mymodels:Net.small``): the
  module is imported (the current directory is searched too) and the callable is called with no
  arguments; it must return the model.

``--checkpoint`` (optional) is a file written by ``torch.save`` holding a state_dict, or a dict with
the state_dict under ``"state_dict"``, ``"model"`` or ``"model_state_dict"``; it is read with
``torch.load(weights_only=True)`` (no pickled code runs) and loaded strictly.

Either way the model is moved to the device and put in eval mode, and is then called as
``model(x, mask)``: see :mod:`medmap_fast.evaluation.inference` for the shapes.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Union

import torch

_STATE_KEYS = ("state_dict", "model", "model_state_dict")


def _import_spec(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {spec!r}: expected 'package.module:callable'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import module {module_name!r} ({e})") from e
    finally:
        if added:
            sys.path.remove(cwd)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(
            f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, expected a callable returning the model"
        )
    model = obj()
    if not callable(model):
        raise TypeError(f"--model {spec!r}: {attr}() returned a {type(model).__name__}, expected a callable model")
    return model


def _state_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--checkpoint {str(path)!r}: cannot read it as a torch.save'd state_dict ({e})") from e
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"--checkpoint {str(path)!r}: expected a state_dict (names -> tensors) or a dict holding one under "
            f"{', '.join(repr(k) for k in _STATE_KEYS)}, got {type(obj).__name__}"
            + (f" with keys {list(obj)[:8]}" if isinstance(obj, dict) else "")
        )
    return obj


def load_model(
    spec: Union[str, os.PathLike],
    checkpoint: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device] = "cpu",
):
    """The model named by ``spec`` (TorchScript file, exported ``.pt2`` or ``module:callable``), with the
    ``checkpoint`` weights loaded, on ``device`` and in eval mode (an exported program as it was exported)."""
    device = torch.device(device)
    path = Path(spec)
    exported = False
    if path.suffix != ".pt2":
        from ..training.checkpoint import model_from_checkpoint, run_checkpoint

        trained = run_checkpoint(path)
        if trained is not None:
            if checkpoint is not None:
                raise ValueError(f"--checkpoint does not apply to --model {str(spec)!r}: a checkpoint of "
                                 "medmap-fast train holds its weights and the settings to rebuild the model")
            return model_from_checkpoint(trained[1], device)
    if path.is_file() and path.suffix == ".pt2":
        if checkpoint is not None:
            raise ValueError(
                f"--checkpoint does not apply to the exported program --model {str(spec)!r}: its weights are inside it"
            )
        try:
            model = torch.export.load(str(path)).module()
        except Exception as e:
            raise ValueError(
                f"--model {str(spec)!r}: the file is not a program readable by torch.export.load ({e})"
            ) from e
        exported = True
    elif path.is_file():
        try:
            model = torch.jit.load(str(path), map_location=device)
        except Exception as e:
            raise ValueError(
                f"--model {str(spec)!r}: the file is not a TorchScript model readable by torch.jit.load ({e})"
            ) from e
    elif ":" in str(spec) and not path.exists():
        model = _import_spec(str(spec))
    else:
        raise ValueError(
            f"--model {str(spec)!r}: expected a TorchScript file, a torch.export .pt2 file or a "
            "'package.module:callable' spec; " + ("it is a directory" if path.is_dir() else "no such file")
        )
    if checkpoint is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"--checkpoint needs a torch.nn.Module to load into; "
                f"--model {str(spec)!r} gave a {type(model).__name__}"
            )
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise ValueError(f"--checkpoint {str(checkpoint)!r}: no such file")
        state = _state_dict(ckpt)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"--checkpoint {str(checkpoint)!r} does not fit --model {str(spec)!r}: {e}") from e
    if isinstance(model, torch.nn.Module) and not exported:  # an exported program has its mode fixed at export
        model = model.to(device).eval()
    return model
