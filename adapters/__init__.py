"""holotx.adapters: holotx transforms behind the ``torch.optim.Optimizer`` interface.

- :class:`TransformOptimizer`: any transform or factory as a real optimizer.
- Drop-in classes with ``holocron.optim``'s signatures: :class:`LARS`, :class:`LAMB`,
  :class:`RaLars`, :class:`TAdam`, :class:`AdaBelief`, :class:`AdamP`, :class:`Adan`,
  :class:`AdEMAMix`; and :class:`Lookahead`, :class:`Scout` around any optimizer.
- By name: :func:`create_optimizer`, :func:`list_optimizers`, :func:`register_optimizer`,
  and the param-group helper :func:`param_groups_weight_decay`.

Installed as ``holotx.adapters`` (the folder sits at the top level of the repository).
"""

from .holocron import LAMB, LARS, AdaBelief, AdamP, Adan, AdEMAMix, RaLars, TAdam
from .optimizer import TransformOptimizer
from .registry import create_optimizer, list_optimizers, param_groups_weight_decay, register_optimizer
from .wrappers import Lookahead, Scout

__all__ = [
    "LAMB",
    "LARS",
    "AdEMAMix",
    "AdaBelief",
    "AdamP",
    "Adan",
    "Lookahead",
    "RaLars",
    "Scout",
    "TAdam",
    "TransformOptimizer",
    "create_optimizer",
    "list_optimizers",
    "param_groups_weight_decay",
    "register_optimizer",
]
