"""optax GradientTransformations: AdamP / SGDP with reference parity, the radial projection
for any inner transform, multi-objective gradient projection (PCGrad, MGDA), projection of
parameters onto constraint sets, parameter labelling (adapters only, no-decay masks, Half
Fine-Tuning), and weight-importance masks for unlearning (WAGLE scores, top-ratio masks, update
or gradient masking)."""

from alignjax.optim.adamp import ScaleByAdamPState, adamp, scale_by_adamp
from alignjax.optim.constraints import project_params
from alignjax.optim.importance import (
    WAGLE_MU,
    ImportanceMaskState,
    accumulate_gradients,
    gradient_scores,
    load_mask,
    magnitude_scores,
    masked_gradients,
    masked_updates,
    random_scores,
    save_mask,
    top_ratio_mask,
    wagle_scores,
)
from alignjax.optim.labels import (
    FROZEN,
    TRAINABLE,
    MaskedTrainState,
    adapter_labels,
    decay_mask,
    hft,
    hft_labels,
    label_by_regex,
    masked_train,
    param_paths,
    path_string,
    set_trainable,
    train_only,
)
from alignjax.optim.multi_objective import (
    TermGradients,
    mgda,
    pcgrad,
    pcgrad_projections,
    term_gradients,
)
from alignjax.optim.projection import (
    ProjectRadialState,
    flax_channel_axes,
    project_radial,
    radial_projection,
    resolve_channel_axes,
)
from alignjax.optim.sgdp import ScaleBySGDPState, scale_by_sgdp, sgdp

__all__ = [
    "FROZEN",
    "TRAINABLE",
    "MaskedTrainState",
    "TermGradients",
    "adapter_labels",
    "decay_mask",
    "hft",
    "hft_labels",
    "label_by_regex",
    "masked_train",
    "mgda",
    "param_paths",
    "path_string",
    "pcgrad",
    "pcgrad_projections",
    "project_params",
    "set_trainable",
    "term_gradients",
    "train_only",
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
    "WAGLE_MU",
    "ImportanceMaskState",
    "accumulate_gradients",
    "gradient_scores",
    "load_mask",
    "magnitude_scores",
    "masked_gradients",
    "masked_updates",
    "random_scores",
    "save_mask",
    "top_ratio_mask",
    "wagle_scores",
]
