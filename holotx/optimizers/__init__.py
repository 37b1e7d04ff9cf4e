"""Optimizers: each one a chain of building blocks, one file per algorithm."""

from holotx.optimizers.adam import adam, adamw
from holotx.optimizers.radam import radam
from holotx.optimizers.sgd import sgd

__all__ = ["adam", "adamw", "radam", "sgd"]
