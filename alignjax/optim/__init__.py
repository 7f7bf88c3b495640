"""optax GradientTransformations: AdamP / SGDP with reference parity, the radial projection
for any inner transform, multi-objective gradient projection (PCGrad, MGDA), projection of
parameters onto constraint sets, and parameter labelling (adapters only, no-decay masks, Half
Fine-Tuning)."""

from alignjax.optim.adamp import ScaleByAdamPState, adamp, scale_by_adamp
from alignjax.optim.projection import (
    ProjectRadialState,
    flax_channel_axes,
    project_radial,
    radial_projection,
    resolve_channel_axes,
)
from alignjax.optim.sgdp import ScaleBySGDPState, scale_by_sgdp, sgdp

__all__ = [
    "ProjectRadialState",
    "ScaleByAdamPState",
    "ScaleBySGDPState",
    "adamp",
    "flax_channel_axes",
    "project_radial",
    "radial_projection",
    "resolve_channel_axes",
    "scale_by_adamp",
    "scale_by_sgdp",
    "sgdp",
]
