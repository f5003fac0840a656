"""The registry of segmentation networks: one name -> one MONAI network, the only way to build one.

Why a registry: CLI choices, error messages and the saved model config all read the names from :data:`MODELS`,
and a model directory records the name and its architecture arguments (``arch_args``), so inference rebuilds
exactly what was trained even after the registry changes. This module imports
no torch at import time (the CLI builds its parser from it); MONAI is imported inside the builders.

Example::

    from cspine.seg.models import create_model
    net = create_model("unet")          # 1 input channel, 9 classes (background, C1..C7, other)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cspine.seg.config import CLASSES

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: its family and architecture arguments (saved with every model, so a trained model is
    rebuilt from its own arguments, not from whatever the registry says today), the input multiple it needs, and
    what it is for."""

    name: str
    family: str
    args: dict[str, Any]
    divisor: int
    description: str

    def arch(self) -> dict[str, Any]:
        """What MODEL_DIR/config.json records as ``arch_args``."""
        return {"family": self.family, **self.args}


def _unet(in_channels: int, out_channels: int, channels: Sequence[int], res_units: int, full_res: bool) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=((1,) if full_res else (2,)) + (2,) * (len(channels) - 2),
        num_res_units=res_units,
        norm="instance",
    )


def _dynunet(in_channels: int, out_channels: int, filters: Sequence[int]) -> nn.Module:
    from monai.networks.nets import DynUNet

    n = len(filters)
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * n,
        strides=[1] + [2] * (n - 1),
        upsample_kernel_size=[2] * (n - 1),
        filters=list(filters),
        norm_name="instance",
        res_block=True,
    )


def _segresnet(in_channels: int, out_channels: int, init_filters: int) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=out_channels,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
    )


#: Network families: family name -> builder(in_channels, out_channels, **arch args).
FAMILIES: dict[str, Callable[..., nn.Module]] = {"unet": _unet, "dynunet": _dynunet, "segresnet": _segresnet}


def _u(channels: tuple[int, ...], res_units: int = 0, full_res: bool = False) -> dict[str, Any]:
    return {"channels": list(channels), "res_units": res_units, "full_res": full_res}


#: Registered networks. "unet" is the default: MONAI's 3D U-Net, 5 levels, first convolution strided (features at
#: 2x the model spacing, a learned transposed convolution back), receptive field larger than the C2-C7 distance so
#: every vertebra can be counted from C2 or T1 (~2 M parameters; its speed: docs/segmentation.md).
#: "unet-fine" is the refinement stage's default: features at the grid spacing itself (the rim is what it must
#: place) but 8 channels there, so a 1.25 mm patch step costs about what the coarse "unet" step does.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("unet", "unet", _u((16, 32, 64, 128, 256)), 16, "3D U-Net 16-256 ch, 5 levels; default, CPU-fast"),
        ModelSpec("unet-tiny", "unet", _u((8, 16, 32, 64)), 8, "3D U-Net 8-64 ch, 4 levels; tests and smoke runs"),
        ModelSpec(
            "unet-full", "unet", _u((16, 32, 64, 128, 256), 0, True), 8, "unet with a full-resolution top level; GPU"
        ),
        ModelSpec(
            "unet-fine", "unet", _u((8, 16, 32, 64, 128), 0, True), 8, "slim full-resolution 3D U-Net; refinement stage"
        ),
        ModelSpec("unet-res", "unet", _u((32, 64, 128, 256, 320), 2), 16, "residual 3D U-Net 32-320 ch; GPU"),
        ModelSpec(
            "dynunet", "dynunet", {"filters": [32, 64, 128, 256, 320]}, 16, "nnU-Net-style residual DynUNet; GPU"
        ),
        ModelSpec(
            "segresnet", "segresnet", {"init_filters": 16}, 8, "SegResNet 16 filters (MONAI); GPU or patient CPU"
        ),
    )
}
DEFAULT_MODEL = "unet"
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; an unknown name lists the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown segmentation model {name!r}; valid: {', '.join(MODEL_NAMES)}") from None


def create_model(
    name: str = DEFAULT_MODEL,
    in_channels: int = 1,
    out_channels: int = len(CLASSES),
    arch_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a registered network (random weights; weights come from a model directory via ``load_model``).

    ``arch_args``: the ``arch_args`` a model directory saved (family + arguments); default: the registry's.
    """
    arch = dict(arch_args) if arch_args is not None else get_spec(name).arch()
    family = arch.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"{name}: unknown network family {family!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[family](in_channels, out_channels, **arch)


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters (for run records and the README table)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
