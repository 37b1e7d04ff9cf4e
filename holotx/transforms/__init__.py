"""Building blocks: small transforms that optimizers are chains of."""

from holotx.transforms.adam import ScaleByAdamState, bias_correction, scale_by_adam
from holotx.transforms.clipping import clip_by_global_norm, global_norm
from holotx.transforms.momentum import TraceState, trace
from holotx.transforms.radam import rectification, scale_by_radam
from holotx.transforms.scale import (
    ScaleByScheduleState,
    scale,
    scale_by_lr,
    scale_by_schedule,
    set_to_zero,
)
from holotx.transforms.weight_decay import add_decayed_weights

__all__ = [
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "bias_correction",
    "clip_by_global_norm",
    "global_norm",
    "rectification",
    "scale",
    "scale_by_adam",
    "scale_by_lr",
    "scale_by_radam",
    "scale_by_schedule",
    "set_to_zero",
    "trace",
]
