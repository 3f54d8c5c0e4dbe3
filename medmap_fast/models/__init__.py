"""Segmentation networks for incomplete multi-modal MRI, built on the fused medmap_fast blocks and ops.

* :class:`UNet3D`: the nnU-Net-style baseline, the modalities as input channels (zeros where missing);
* :class:`SLSNet`: one encoder per modality, masked fusion at every level, one shared decoder.

Both take ``fused=False`` for the same architecture from plain ``torch.nn`` (same state_dict), and
``Model.small()`` for a configuration that runs on a CPU. A checkpoint rebuilds its model with
``build_model(name, **model.config())``.
"""

from __future__ import annotations

from typing import Dict, Type

from torch import nn

from ._parts import SegOutput
from .sls import FUSIONS, SLSNet
from .unet import UNet3D

MODEL_CLASSES: Dict[str, Type[nn.Module]] = {"unet3d": UNet3D, "slsnet": SLSNet}


def build_model(name: str, **kwargs) -> nn.Module:
    """The model ``name`` (a key of :data:`MODEL_CLASSES`) built with ``kwargs`` (e.g. a stored ``config()``)."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"name must be one of {tuple(MODEL_CLASSES)}, got {name!r}")
    return MODEL_CLASSES[name](**kwargs)


__all__ = ["UNet3D", "SLSNet", "SegOutput", "build_model", "MODEL_CLASSES", "FUSIONS"]
