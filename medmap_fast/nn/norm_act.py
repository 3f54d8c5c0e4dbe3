"""The fused normalisation + activation module, and :func:`convert`, which puts it into existing models."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.norm_act import _check_inputs, norm_act

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class FusedNormAct(nn.Module):
    """Instance or group norm (affine), activation and optional residual in one fused op.

    Its parameters are ``weight`` and ``bias`` (C,), initialised to 1 and 0, exactly those of
    ``nn.InstanceNorm3d(C, affine=True)`` or ``nn.GroupNorm(G, C)``, so state dicts load both ways.
    ``forward(x, residual=None)``: see :func:`medmap_fast.norm_act`.

    ``spatial_dims``: the number of spatial dims the module is for (3 for volumes), as
    ``nn.InstanceNorm3d`` knows it. With it, an input of ``spatial_dims + 1`` dims is read as one
    unbatched sample (C, *spatial), as torch's instance norms read it, and an input of any other rank
    but ``spatial_dims + 2`` is refused. Without it (None) every input is (B, C, *spatial), as for
    ``nn.GroupNorm`` and the functional op.
    """

    def __init__(
        self,
        num_channels: int,
        norm: str = "instance",
        num_groups: Optional[int] = None,
        activation: Optional[str] = "leaky_relu",
        negative_slope: float = 0.01,
        eps: float = 1e-5,
        affine: bool = True,
        residual_position: str = "before_activation",
        backend: Optional[str] = None,
        spatial_dims: Optional[int] = None,
    ):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        if spatial_dims is not None and (isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int)
                                         or spatial_dims < 1):
            raise ValueError(f"spatial_dims must be a positive integer or None, got {spatial_dims!r}")
        # Validate once here, with a small probe, so that a bad configuration fails at construction.
        probe = torch.zeros(1, num_channels, 1)
        _check_inputs(probe, None, None, norm, num_groups, activation, negative_slope, None,
                          residual_position, eps)
        self.num_channels = num_channels
        self.norm = norm
        self.num_groups = num_groups
        self.activation = "identity" if activation is None else activation
        self.negative_slope = negative_slope
        self.eps = eps
        self.affine = affine
        self.residual_position = residual_position
        self.backend = backend
        self.spatial_dims = spatial_dims
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        unbatched = self._unbatched(x)
        if unbatched:
            # The statistics of one sample over its own voxels, exactly as a batch of one.
            x = x.unsqueeze(0)
            if isinstance(residual, Tensor):
                if residual.dim() != x.dim() - 1:
                    raise ValueError(f"residual must have x's shape {tuple(x.shape[1:])}, "
                                     f"got {tuple(residual.shape)}")
                residual = residual.unsqueeze(0)
        y = norm_act(
            x, self.weight, self.bias, norm=self.norm, num_groups=self.num_groups, activation=self.activation,
            negative_slope=self.negative_slope, residual=residual, eps=self.eps, backend=self.backend,
            residual_position=self.residual_position,
        )
        return y.squeeze(0) if unbatched else y

    def _unbatched(self, x) -> bool:
        """Whether ``x`` is one sample without its batch dim; refuses ranks this module is not for."""
        n = getattr(self, "spatial_dims", None)  # modules pickled before the attribute existed: batched only
        if n is None or not isinstance(x, Tensor) or x.dim() == n + 2:
            return False
        if x.dim() == n + 1:
            return True
        raise ValueError(
            f"x must be a {n + 2}-D (B, C, *spatial) or, unbatched, a {n + 1}-D (C, *spatial) tensor for a module "
            f"with spatial_dims={n}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )

    def extra_repr(self) -> str:
        groups = f", num_groups={self.num_groups}" if self.norm == "group" else ""
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        dims = f", spatial_dims={self.spatial_dims}" if self.spatial_dims is not None else ""
        return (f"{self.num_channels}, norm={self.norm!r}{groups}, activation={self.activation!r}{slope}, "
                f"eps={self.eps}, affine={self.affine}{dims}")

    @classmethod
    def from_modules(cls, norm: nn.Module, activation: Optional[nn.Module] = None, backend: Optional[str] = None):
        """The fused equivalent of ``norm`` (InstanceNorm1/2/3d without running stats, or GroupNorm)
        followed by ``activation`` (LeakyReLU, ReLU, Identity or None). The parameters are shared,
        not copied, so optimizers and tied weights keep working."""
        why = unsupported_norm(norm)
        if why:
            raise ValueError(f"norm: {why}")
        act, slope = _activation_of(activation)
        if act is None:
            raise ValueError(f"activation must be nn.LeakyReLU, nn.ReLU, nn.Identity or None, "
                             f"got {type(activation).__name__}")
        if isinstance(norm, nn.GroupNorm):
            fused = cls(norm.num_channels, "group", norm.num_groups, act, slope, norm.eps, norm.affine,
                        backend=backend)
        else:
            # torch's instance norms take unbatched input (one rank less); the fused module does the same.
            dims = _INSTANCE_NORMS.index(type(norm)) + 1 if type(norm) in _INSTANCE_NORMS else None
            fused = cls(norm.num_features, "instance", None, act, slope, norm.eps, norm.affine, backend=backend,
                        spatial_dims=dims)
        if norm.affine:
            fused.weight, fused.bias = norm.weight, norm.bias
        return fused.train(norm.training)


def unsupported_norm(module: nn.Module) -> Optional[str]:
    """None if ``module`` is a norm that :class:`FusedNormAct` computes exactly, else why not."""
    if isinstance(module, nn.GroupNorm):
        return None
    if isinstance(module, _INSTANCE_NORMS):
        if module.track_running_stats:
            return ("instance norms with track_running_stats=True use running statistics in eval mode, "
                    "which the fused op does not keep")
        return None
    return f"expected nn.InstanceNorm1d/2d/3d or nn.GroupNorm, got {type(module).__name__}"


def _activation_of(module: Optional[nn.Module]):
    """(activation name, slope) of a module convert() can fuse, else (None, None)."""
    if module is None or type(module) is nn.Identity:
        return "identity", 0.01
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.ReLU:
        return "relu", 0.01
    return None, None


def convert(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Swap every InstanceNorm / GroupNorm in ``model`` (in place) for :class:`FusedNormAct`.

    In an ``nn.Sequential`` (the Conv3d -> InstanceNorm3d -> LeakyReLU and norm -> activation ->
    conv blocks of nnU-Net-style encoders and decoders), a norm directly followed by an
    ``nn.LeakyReLU`` or ``nn.ReLU`` absorbs it: the activation's slot becomes ``nn.Identity``, so
    indices and state_dict keys stay as they were. A norm whose activation is applied elsewhere (in
    a ``forward`` that convert cannot see) is fused alone, with no activation, which still keeps
    channels_last_3d tensors channels-last. Parameters are shared with the original modules (an
    optimizer built before the conversion keeps working). Instance norms with running statistics
    are left alone. Returns ``model`` (or the fused module when ``model`` itself is a norm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if unsupported_norm(model) is None:
        return FusedNormAct.from_modules(model, None, backend)
    for parent in list(model.modules()):
        names = list(parent._modules.keys())
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None or unsupported_norm(child) is not None:
                continue
            nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            fuse_next = isinstance(parent, nn.Sequential) and nxt is not None and type(nxt) in (nn.LeakyReLU,
                                                                                                 nn.ReLU)
            parent._modules[name] = FusedNormAct.from_modules(child, nxt if fuse_next else None, backend)
            if fuse_next:
                parent._modules[names[i + 1]] = nn.Identity()
    return model
