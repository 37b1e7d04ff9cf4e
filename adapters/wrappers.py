"""Lookahead and Scout around any ``torch.optim.Optimizer`` (holotx's or torch's own).

The same rule as :func:`holotx.lookahead` and :func:`holotx.scout`, at the level of an
optimizer: the base optimizer moves the params (the fast weights); after every
``sync_period`` of a param's steps, its slow weights move towards it,
``slow += rate * (fast - slow)``, and the param is put on them. Scout's rate is
:math:`\\max(1 - C, \\text{sync\\_rate})`, with :math:`C` computed, as in
:func:`holotx.scout`, from the param changes of the window.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from holotx import executor, ops
from holotx.optimizers._common import holocron_mode
from holotx.wrappers._sync import validate_sync
from holotx.wrappers.scout import _accumulate, _fresh_window, _spread_ratio_sums, coherence_rate

from ._formats import whole_count
from .optimizer import check_state_dict

__all__ = ["Lookahead", "Scout"]


class _MergedEntry(MutableMapping):
    """One param's entry of :class:`_MergedState`: its keys of the wrapper (``<prefix>_*``)
    read and written in the wrapper's state, the others in the base optimizer's."""

    def __init__(self, wrapper: _SyncWrapper, param: torch.Tensor) -> None:
        self._wrapper, self._param = wrapper, param

    def _home(self, key: str) -> dict[torch.Tensor, dict[str, Any]]:
        w = self._wrapper
        return w._own if isinstance(key, str) and key.startswith(w.prefix + "_") else w.base_optimizer.state

    def __getitem__(self, key: str) -> Any:
        home = self._home(key)
        if self._param not in home:  # (reading creates nothing)
            raise KeyError(key)
        return home[self._param][key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._home(key).setdefault(self._param, {})[key] = value

    def __delitem__(self, key: str) -> None:
        home = self._home(key)
        if self._param not in home:
            raise KeyError(key)
        del home[self._param][key]

    def _parts(self) -> list[dict[str, Any]]:
        w, p = self._wrapper, self._param
        return [d[p] for d in (w.base_optimizer.state, w._own) if p in d]

    def __iter__(self) -> Iterator[str]:
        for part in self._parts():
            yield from part

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())

    def __repr__(self) -> str:
        return repr(dict(self))


class _MergedState(MutableMapping):
    """The wrapper's ``state``: per param, a :class:`_MergedEntry` over the base
    optimizer's state and the wrapper's (an entry for any param, as a defaultdict). A key
    that is not a tensor (what a state-dict hook may store, ``state["note"] = 1``, which
    torch.optim allows) is the base optimizer's, as it is: ``state_dict()`` then carries
    it, as torch.optim's does."""

    def __init__(self, wrapper: _SyncWrapper) -> None:
        self._wrapper = wrapper

    def __getitem__(self, param: Any) -> Any:
        if not isinstance(param, torch.Tensor):
            return self._wrapper.base_optimizer.state[param]
        return _MergedEntry(self._wrapper, param)

    def __setitem__(self, param: Any, entry: Any) -> None:
        if not isinstance(param, torch.Tensor):
            self._wrapper.base_optimizer.state[param] = entry
            return
        view = _MergedEntry(self._wrapper, param)
        for d in (self._wrapper.base_optimizer.state, self._wrapper._own):
            d.pop(param, None)
        view.update(entry)

    def __delitem__(self, param: Any) -> None:
        if param not in self:
            raise KeyError(param)
        for d in (self._wrapper.base_optimizer.state, self._wrapper._own):
            d.pop(param, None)

    def __contains__(self, param: object) -> bool:
        return param in self._wrapper.base_optimizer.state or param in self._wrapper._own

    def _params(self) -> list[torch.Tensor]:
        base, own = self._wrapper.base_optimizer.state, self._wrapper._own
        return [*base, *(p for p in own if p not in base)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._params())

    def __len__(self) -> int:
        return len(self._params())

    def __repr__(self) -> str:
        return repr({p: dict(self[p]) if isinstance(p, torch.Tensor) else self[p] for p in self})


class _SyncWrapper(Optimizer):
    """What Lookahead and Scout share: the base optimizer's groups seen as the wrapper's
    own (so a scheduler on the wrapper reaches them), per-param step counts, slow weights
    created at a param's first step, and a state dict that holds both."""

    prefix = ""
    _stat_keys: tuple[str, ...] = ()

    def __init__(self, base_optimizer: Optimizer, sync_rate: float = 0.5, sync_period: int = 6, *,
                 compat: str | None = None) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise ValueError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got "
                             f"{type(base_optimizer).__name__}")
        validate_sync(sync_rate, sync_period)
        holocron_mode(compat)
        self.base_optimizer = base_optimizer
        self.sync_rate = sync_rate
        self.sync_period = sync_period
        self.compat = compat
        # torch's Optimizer.__init__ would copy the groups; __setstate__ sets up the hooks.
        self._own: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        # (A copy: torch's __setstate__ writes "differentiable" into the dict it is given,
        # which must not change the base optimizer's defaults and so its checkpoints.)
        Optimizer.__setstate__(self, {"defaults": dict(base_optimizer.defaults)})

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = groups

    @property
    def state(self) -> _MergedState:  # type: ignore[override]
        """Per param, the base optimizer's state and the wrapper's (``lookahead_slow``,
        ``lookahead_count``, ...) as one dict, keyed as :meth:`state_dict` saves them
        (``torch.distributed.checkpoint`` reads the keys here). A live view: what is
        written into it (by a state-dict hook, say) lands in the base optimizer's state or
        the wrapper's, by key."""
        return _MergedState(self)

    @state.setter
    def state(self, value: Mapping[torch.Tensor, Mapping[str, Any]]) -> None:
        view = _MergedState(self)
        view.clear()
        for p, entry in value.items():
            view[p] = entry

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its params get their slow weights at their
        first step (their window starts then).

        Args:
            param_group: ``{"params": [...], **hyperparameters}``, as the base optimizer's
                ``add_param_group`` takes it (and checks it).

        Returns:
            ``None``.

        Example:
            >>> import torch
            >>> from holotx.adapters import Lookahead
            >>> opt = Lookahead(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
            >>> opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01})
            >>> [g["lr"] for g in opt.base_optimizer.param_groups]
            [0.1, 0.01]
        """
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``.

        Args:
            set_to_none: set each ``grad`` to ``None`` (default ``True``) instead of
                zeroing it.

        Returns:
            ``None``.

        Example:
            >>> import torch
            >>> from holotx.adapters import Scout
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = Scout(torch.optim.SGD([w], lr=0.1))
            >>> w.grad = torch.ones(2)
            >>> opt.zero_grad()
            >>> w.grad is None
            True
        """
        self.base_optimizer.zero_grad(set_to_none)

    def _key(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _fresh_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """A param's state at its first step: its slow weights (the param as it is) and count."""
        return {self._key("slow"): p.detach().clone(), self._key("count"): torch.zeros((), dtype=torch.int64)}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The base optimizer's step, then the synchronisation of the params whose window
        of ``sync_period`` steps ends (each param counts its own steps).

        Args:
            closure: re-evaluates the model and returns the loss, passed to the base
                optimizer's ``step``.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Example:
            >>> import torch
            >>> from holotx.adapters import Lookahead
            >>> w = torch.nn.Parameter(torch.zeros(1))
            >>> opt = Lookahead(torch.optim.SGD([w], lr=1.0), sync_rate=0.5, sync_period=2)
            >>> for _ in range(2):
            ...     w.grad = -torch.ones(1)
            ...     opt.step()
            >>> w.data  # two fast steps to 2, then halfway back to the slow weights at 0
            tensor([1.])
        """
        params = self._params()
        with torch.no_grad():
            # A new param's slow weights are taken before the base step and kept once it
            # has run: a base step that raises (a sparse gradient, a bad value edited into a
            # group) leaves the wrapper's state as it was, as it leaves the base's.
            fresh = {p: self._fresh_state(p) for p in params if p not in self._own}
            before = self._before(params)
        loss = self._base_step(closure)
        with torch.no_grad():
            self._own.update(fresh)
            holocron = self.compat == "holocron"
            # A param without a gradient was not stepped by the base optimizer; Holocron's
            # wrappers count it all the same.
            stepped = [p for p in params if holocron or p.grad is not None]
            ends = []
            for p in stepped:
                count = self._own[p][self._key("count")]
                count.add_(1)
                if int(count) % self.sync_period == 0:
                    ends.append(p)
            self._after(stepped, ends, before)
        return loss

    def _base_step(self, closure: Callable[[], Any] | None) -> Any:
        """The base optimizer's step with its own step hooks, and without torch's global
        ones: those ran for the step the user called (this wrapper's), and would run twice
        per step. A base whose ``step`` was replaced on the instance (a scheduler built on
        it) is called as it is, so that the replacement sees the call."""
        base = self.base_optimizer
        unhooked = getattr(type(base).step, "__wrapped__", None)
        if unhooked is None or "step" in vars(base):
            return base.step(closure) if closure is not None else base.step()
        args: tuple[Any, ...] = (base,) if closure is None else (base, closure)
        kwargs: dict[str, Any] = {}
        for hook in list(base._optimizer_step_pre_hooks.values()):
            result = hook(base, args, kwargs)
            if result is not None:
                args, kwargs = result
        out = unhooked(*args, **kwargs)
        for hook in list(base._optimizer_step_post_hooks.values()):
            hook(base, args, kwargs)
        return out

    def _before(self, params: list[torch.Tensor]) -> Any:
        """What the wrapper needs from before the base step, handed to :meth:`_after` (a
        local, not an attribute: under torch.compile an attribute set in one graph and read
        after a graph break is not there)."""
        return None

    def _after(self, stepped: list[torch.Tensor], ends: list[torch.Tensor], before: Any) -> None:
        raise NotImplementedError

    def _synchronize(self, ends: list[torch.Tensor], rate: Any) -> None:
        """``slow += rate * (fast - slow)`` (only for a rate > 0: a NaN rate leaves the slow
        weights), then the params take the slow weights."""
        if not ends:
            return
        slow = [self._own[p][self._key("slow")] for p in ends]
        if rate > 0:
            torch._foreach_lerp_(slow, ends, float(rate))
        ops.copy(ends, slow)

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, each param's entry holding the wrapper's state
        too (``lookahead_slow``, ``lookahead_count``, ...), each group recording
        ``sync_rate`` and ``sync_period``.

        Returns:
            ``{"state": {index: {key: value}}, "param_groups": [...]}``, as torch.optim's.

        Example:
            >>> import torch
            >>> from holotx.adapters import Lookahead
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = Lookahead(torch.optim.SGD([w], lr=0.1, momentum=0.9))
            >>> w.grad = torch.ones(2)
            >>> opt.step()
            >>> sorted(opt.state_dict()["state"][0])
            ['lookahead_count', 'lookahead_slow', 'momentum_buffer']
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        base = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base["state"].items()}
        for p, entry in self._own.items():
            state.setdefault(index[id(p)], {}).update(entry)
        groups = [{**g, self._key("sync_rate"): self.sync_rate, self._key("sync_period"): self.sync_period}
                  for g in base["param_groups"]]
        state_dict = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapper's state and the base optimizer's. The wrapper's part is
        checked first (its keys, shapes, ``sync_period``), then the base optimizer loads
        its own; if either fails, nothing has changed.

        Args:
            state_dict: what :meth:`state_dict` returned, from a wrapper of the same kind
                and ``sync_period`` around the same base optimizer.

        Returns:
            ``None``.

        Example:
            >>> import torch
            >>> from holotx.adapters import Lookahead
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = Lookahead(torch.optim.SGD([w], lr=0.1))
            >>> w.grad = torch.ones(2)
            >>> opt.step()
            >>> again = Lookahead(torch.optim.SGD([w], lr=0.1))
            >>> again.load_state_dict(opt.state_dict())
            >>> again.state[w]["lookahead_count"]
            tensor(1)
        """
        check_state_dict(state_dict)
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        check_state_dict(state_dict)
        name = type(self).__name__
        params = self._params()
        ours = {self._key(k) for k in ("slow", "count", *self._stat_keys)}
        groups = state_dict["param_groups"]
        for g, group in enumerate(groups):
            # A flattened torch.distributed.checkpoint keeps only the live groups' keys.
            period = group.get(self._key("sync_period"), self.sync_period)
            rate = group.get(self._key("sync_rate"), self.sync_rate)
            try:
                validate_sync(rate, period)
            except ValueError as err:
                raise ValueError(f"param group {g} of the checkpoint: {err}") from None
            if period != self.sync_period:
                raise ValueError(f"param group {g} of the checkpoint was saved with sync_period={period}, "
                                 f"this {name} has {self.sync_period}")
        saved_ids = [i for group in groups for i in group["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"the checkpoint has {len(saved_ids)} params, this {name} {len(params)}")
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        base_state: dict[Any, dict[str, Any]] = {}
        for i, p in zip(saved_ids, params):
            entry = dict(state_dict["state"].get(i, {}))
            mine = {k: entry.pop(k) for k in list(entry) if k in ours}
            if entry:
                base_state[i] = entry
            if not mine:
                continue
            if set(mine) != ours:
                raise ValueError(f"param {i}: the checkpoint has {sorted(mine)}, {name} expects "
                                 f"{sorted(ours)}")
            new_state[p] = {}
            for k, v in mine.items():
                expected = self._shape(k, p) if k != self._key("count") else torch.Size([])
                if not isinstance(v, torch.Tensor) or v.shape != expected:
                    raise ValueError(f"param {i}, key {k!r}: expected a tensor of shape {tuple(expected)}")
                if v.device.type == "meta":
                    raise ValueError(f"param {i}, key {k!r}: a meta tensor has no values to load")
                if k == self._key("count"):
                    v = whole_count(v, f"param {i}, key {k!r}")
                    new_state[p][k] = v.to(device="cpu", dtype=torch.int64, copy=True)
                else:
                    dtype = self._dtype(k, p)
                    new_state[p][k] = v.to(device=p.device, dtype=dtype, copy=True)
        base_groups = [{k: v for k, v in group.items()
                        if k not in (self._key("sync_rate"), self._key("sync_period"))} for group in groups]
        self.base_optimizer.load_state_dict({"state": base_state, "param_groups": base_groups})
        self.sync_rate = groups[0].get(self._key("sync_rate"), self.sync_rate) if groups else self.sync_rate
        self._own = defaultdict(dict, new_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _dtype(self, key: str, p: torch.Tensor) -> torch.dtype:
        return p.dtype

    def _shape(self, key: str, p: torch.Tensor) -> torch.Size:
        return p.shape

    # -- copies and printing --------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"base_optimizer": self.base_optimizer, "sync_rate": self.sync_rate,
                "sync_period": self.sync_period, "compat": self.compat, "state": self._own,
                "defaults": self.base_optimizer.defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._own = defaultdict(dict, state.pop("state"))
        Optimizer.__setstate__(self, state)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.base_optimizer).splitlines())
        compat = f", compat={self.compat!r}" if self.compat else ""
        return (f"{type(self).__name__}(sync_rate={self.sync_rate}, sync_period={self.sync_period}{compat}) "
                f"around\n{inner}")


class Lookahead(_SyncWrapper):
    r"""Lookahead (Zhang et al., 2019, "Lookahead Optimizer: k steps forward, 1 step
    back") around any optimizer, with ``holocron.optim.Lookahead``'s signature.

    After every ``sync_period`` steps of a param (default 6), its slow weights move
    towards it by ``sync_rate`` (default 0.5) and the param is put on them. The base
    optimizer's state carries on across synchronisations. Counts are per param: one
    whose ``.grad`` is ``None`` at a step was not stepped and does not count it
    (``compat="holocron"`` counts every step for every param, as Holocron does).

    Differences from Holocron 0.3.0: the slow weights are taken at a param's first step
    (Holocron takes them when wrapping), ``add_param_group`` works, ``state_dict`` saves
    the slow weights and counts and loads them back (Holocron's raises on torch >= 2.1),
    and an LR scheduler on the wrapper reaches the base optimizer's groups (Holocron's
    changes a copy).

    The base optimizer may be fused (``TransformOptimizer(..., fused=True)``, torch's
    ``fused=True``): its step is unchanged; the wrapper's own work (the slow weights,
    every ``sync_period`` steps) runs eagerly, per param. For the whole rule in one
    compiled step, use the transform instead:
    ``TransformOptimizer(params, lambda: holotx.lookahead(holotx.adamw(1e-3)), fused=True)``
    (:func:`holotx.scout` likewise).

    Args:
        base_optimizer: the optimizer to wrap: any ``torch.optim.Optimizer``.
        sync_rate: :math:`\alpha \in [0, 1]`, the step of the slow weights (default ``0.5``).
        sync_period: :math:`k`, steps between synchronisations (a positive int, default ``6``).
        compat: ``None`` (default) or ``"holocron"`` for Holocron 0.3.0's rule.

    Example:
        >>> import torch
        >>> from holotx.adapters import Lookahead
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = Lookahead(torch.optim.SGD([w], lr=1.0), sync_rate=0.5, sync_period=2)
        >>> for _ in range(2):
        ...     w.grad = torch.tensor([-1.0])
        ...     opt.step()
        >>> w  # two fast steps to 2, then halfway back to the slow weights
        Parameter containing:
        tensor([1.], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['lookahead_count', 'lookahead_slow']

    References:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
        NeurIPS 2019, https://arxiv.org/abs/1907.08610.
    """

    prefix = "lookahead"

    def _after(self, stepped: list[torch.Tensor], ends: list[torch.Tensor], before: Any) -> None:
        self._synchronize(ends, self.sync_rate)


class Scout(_SyncWrapper):
    """Holocron's Scout around any optimizer: :class:`Lookahead` whose rate is
    :math:`\\max(1 - C, \\text{sync\\_rate})`, :math:`C` the mean over the params that
    synchronise of the mean, over their elements, of std/max-deviation of the element's
    changes over the window (see :func:`holotx.scout`).

    The changes are the params' realised ones, ``p_after - p_before`` around each base
    step, accumulated in O(1) memory per element (Welford's mean and M2, the minimum and
    the maximum: float32 for half-precision params; a complex param's over its real view,
    ``(..., 2)``, as torch.optim steps it). By default, elements whose changes
    were constant over the window are left out, so the rate is never NaN;
    ``compat="holocron"`` reproduces Holocron 0.3.0, NaN included (a NaN rate puts the
    params back on the slow weights without an outer step). Also see :class:`Lookahead`
    for counts, checkpoints and schedulers.

    Args:
        base_optimizer: the optimizer to wrap: any ``torch.optim.Optimizer``.
        sync_rate: the lowest rate, in [0, 1] (default ``0.5``).
        sync_period: :math:`k`, steps between synchronisations (a positive int, default ``6``).
        compat: ``None`` (default) or ``"holocron"`` for pylocron 0.3.0's Scout.

    Example:
        >>> import torch
        >>> from holotx.adapters import Scout
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = Scout(torch.optim.SGD([w], lr=1.0), sync_rate=0.0, sync_period=3)
        >>> for g in ([-1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]):
        ...     w.grad = torch.tensor(g)
        ...     opt.step()
        >>> w  # as holotx.scout's example: the rate is 1 - C
        Parameter containing:
        tensor([0.4019, 0.1340], requires_grad=True)

    References:
        Scout is Holocron's own wrapper (no paper): https://github.com/frgfm/Holocron
        (``holocron.optim.wrapper.Scout``). It extends Lookahead:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
        NeurIPS 2019, https://arxiv.org/abs/1907.08610.
    """

    prefix = "scout"
    _stat_keys = ("mean", "m2", "min", "max")

    def _dtype(self, key: str, p: torch.Tensor) -> torch.dtype:
        if key == self._key("slow"):
            return p.dtype
        real = _real(p).dtype
        if self.compat == "holocron":
            return real
        return torch.float32 if real in (torch.float16, torch.bfloat16) else real

    def _shape(self, key: str, p: torch.Tensor) -> torch.Size:
        return p.shape if key == self._key("slow") else _real(p).shape

    def _fresh_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = super()._fresh_state(p)
        dtype = self._dtype(self._key("mean"), p)
        for key, fill in (("mean", 0.0), ("m2", 0.0), ("min", math.inf), ("max", -math.inf)):
            state[self._key(key)] = torch.full_like(_real(p), fill, dtype=dtype,
                                                    memory_format=torch.preserve_format)
        return state

    def _before(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        # The params before the base step (with a closure, which params get a gradient is
        # known only after it).
        return {p: p.detach().clone() for p in params}

    def _after(self, stepped: list[torch.Tensor], ends: list[torch.Tensor], before: Any) -> None:
        previous = before
        if not stepped:
            return
        k = self.sync_period
        holocron = self.compat == "holocron"
        by_dtype: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in stepped:
            by_dtype.setdefault((p.device, p.dtype), []).append(p)
        ending = set(ends)
        sums: list[Any] = []
        for ps in by_dtype.values():
            st = [self._own[p] for p in ps]
            mean, m2, low, high = ([s[self._key(n)] for s in st] for n in self._stat_keys)
            dtype = mean[0].dtype
            change = [(_real(p).to(dtype) - _real(previous[p]).to(dtype)) for p in ps]
            weight = [1.0 / ((int(s[self._key("count")]) - 1) % k + 1) for s in st]
            flags = [p in ending for p in ps]
            # The statistics are the wrapper's own: the math may write them in place.
            with executor.owned_step(ps, change):
                mean, m2, low, high = _accumulate(change, mean, m2, low, high, weight)
                for j, flag in enumerate(flags):
                    if flag:
                        sums.append(_spread_ratio_sums(mean[j], m2[j], low[j], high[j], k, holocron, None))
                stats = _fresh_window(flags, mean, m2, low, high)
            for s, values in zip(st, zip(*stats)):  # in place already, unless torch declined
                for name, value in zip(self._stat_keys, values):
                    s[self._key(name)] = value
        if not ends:
            return
        rate = coherence_rate(sums, [True] * len(sums), self.sync_rate, holocron=holocron,
                              device=torch.device("cpu"))
        self._synchronize(ends, rate if not isinstance(rate, torch.Tensor) else rate.item())


def _real(p: torch.Tensor) -> torch.Tensor:
    """A complex param as its real view, whose numbers Scout's statistics follow one by
    one (as :func:`holotx.scout` and torch.optim see a complex param); a real one as it is."""
    return torch.view_as_real(p) if p.is_complex() else p
