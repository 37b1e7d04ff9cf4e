"""holotx: pure, composable optimizer transforms for PyTorch.

``state = tx.init(params)``; ``updates, state = tx.update(grads, state, params)``;
``params = holotx.apply_updates(params, updates)``. See README.md.
"""

from holotx import flat, ops, schedules, tree
from holotx.base import (
    EmptyState,
    GradientTransformation,
    Params,
    State,
    Updates,
    apply_updates,
    identity,
    stateless,
)
from holotx.combine import (
    ApplyIfFiniteState,
    MaskedState,
    MultiStepsState,
    PartitionState,
    apply_if_finite,
    chain,
    freeze,
    masked,
    multi_steps,
    named_chain,
    partition,
)
from holotx.hyperparams import InjectHyperparamsState, inject_hyperparams
from holotx.optimizers import adam, adamw, radam, sgd
from holotx.schedules import (
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
    warmup_cosine_decay_schedule,
)
from holotx.transforms import (
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    global_norm,
    scale,
    scale_by_adam,
    scale_by_lr,
    scale_by_radam,
    scale_by_schedule,
    set_to_zero,
    trace,
)

__version__ = "0.1.0"

__all__ = [
    "ApplyIfFiniteState",
    "EmptyState",
    "GradientTransformation",
    "InjectHyperparamsState",
    "MaskedState",
    "MultiStepsState",
    "Params",
    "PartitionState",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "Schedule",
    "State",
    "TraceState",
    "Updates",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_if_finite",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "flat",
    "freeze",
    "global_norm",
    "identity",
    "inject_hyperparams",
    "join_schedules",
    "linear_schedule",
    "masked",
    "multi_steps",
    "named_chain",
    "ops",
    "partition",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "radam",
    "scale",
    "scale_by_adam",
    "scale_by_lr",
    "scale_by_radam",
    "scale_by_schedule",
    "schedules",
    "set_to_zero",
    "sgd",
    "stateless",
    "trace",
    "tree",
    "warmup_cosine_decay_schedule",
]
