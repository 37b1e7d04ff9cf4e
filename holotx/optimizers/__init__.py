"""Optimizers: each one a chain of building blocks, one file per algorithm."""

from holotx.optimizers.adabelief import adabelief
from holotx.optimizers.adam import adam, adamw
from holotx.optimizers.adamp import adamp
from holotx.optimizers.adan import adan
from holotx.optimizers.ademamix import ademamix
from holotx.optimizers.lamb import lamb
from holotx.optimizers.lars import lars
from holotx.optimizers.radam import radam
from holotx.optimizers.ralars import ralars
from holotx.optimizers.sgd import sgd
from holotx.optimizers.tadam import tadam

__all__ = [
    "adabelief", "adam", "adamp", "adamw", "adan", "ademamix", "lamb", "lars", "radam", "ralars", "sgd",
    "tadam",
]
