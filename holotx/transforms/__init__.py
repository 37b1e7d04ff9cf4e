"""Building blocks: small transforms that optimizers are chains of."""

from holotx.transforms.adam import ScaleByAdamState, bias_correction, scale_by_adam
from holotx.transforms.adamp import projection_coefficients, scale_by_adamp
from holotx.transforms.adan import ScaleByAdanState, scale_by_adan
from holotx.transforms.ademamix import ScaleByAdEMAMixState, ademamix_warmup, scale_by_ademamix
from holotx.transforms.belief import ScaleByBeliefState, scale_by_belief
from holotx.transforms.clipping import clip_by_global_norm, global_norm
from holotx.transforms.momentum import TraceState, trace
from holotx.transforms.radam import rectification, scale_by_radam
from holotx.transforms.scale import (
    ScaleByScheduleState,
    add_decayed_weights,
    scale,
    scale_by_lr,
    scale_by_schedule,
    set_to_zero,
)
from holotx.transforms.tadam import ScaleByTAdamState, scale_by_tadam
from holotx.transforms.trust_ratio import TrustRatioState, scale_by_trust_ratio, trust_ratios

__all__ = [
    "ScaleByAdEMAMixState",
    "ScaleByAdamState",
    "ScaleByAdanState",
    "ScaleByBeliefState",
    "ScaleByScheduleState",
    "ScaleByTAdamState",
    "TraceState",
    "TrustRatioState",
    "add_decayed_weights",
    "ademamix_warmup",
    "bias_correction",
    "clip_by_global_norm",
    "global_norm",
    "projection_coefficients",
    "rectification",
    "scale",
    "scale_by_adam",
    "scale_by_adamp",
    "scale_by_adan",
    "scale_by_ademamix",
    "scale_by_belief",
    "scale_by_lr",
    "scale_by_radam",
    "scale_by_schedule",
    "scale_by_tadam",
    "scale_by_trust_ratio",
    "set_to_zero",
    "trace",
    "trust_ratios",
]
