"""Higher-order transforms: each takes a transform and returns one."""

from holotx.wrappers.lookahead import LookaheadState, lookahead
from holotx.wrappers.scout import ScoutState, coherence_rate, scout

__all__ = ["LookaheadState", "ScoutState", "coherence_rate", "lookahead", "scout"]
