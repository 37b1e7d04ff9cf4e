"""Adam's moment estimates, as a building block."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from holotx import _validate, ops
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar
from holotx.tree import zeros_like

__all__ = [
    "ScaleByAdamState",
    "adaptive_ratio",
    "bias_correction",
    "corrected_denominator",
    "numbers",
    "moments",
    "per_step_scalars",
    "per_leaf",
    "scale_by_adam",
    "scalar_dtype",
    "square_root",
    "step_counts",
]


class ScaleByAdamState(NamedTuple):
    """The state of :func:`scale_by_adam` (also kept by AdamP, RAdam, LAMB and RaLars).

    Args:
        count: steps taken by each leaf: a tree of 0-d int64 tensors (torch's per-parameter
            ``step``).
        mu: the first moment (``exp_avg`` in torch.optim).
        nu: the second moment (``exp_avg_sq``).
        nu_max: the running max of ``nu`` with ``amsgrad`` (``max_exp_avg_sq``), else ``None``.

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scale_by_adam().init({"w": torch.zeros(2)})
        >>> state.count["w"], state.mu["w"], state.nu_max
        (tensor(0), tensor([0., 0.]), None)
    """

    count: object
    """Steps taken by each leaf: a tree of 0-d int64 tensors (torch's per-parameter ``step``)."""
    mu: object
    """First moment (``exp_avg`` in torch.optim)."""
    nu: object
    """Second moment (``exp_avg_sq``)."""
    nu_max: object
    """Running max of ``nu`` with ``amsgrad`` (``max_exp_avg_sq``), else ``None``."""


def scalar_dtype(device: torch.device) -> torch.dtype:
    """Per-step scalars are float64 (so float64 params are exact); MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def bias_correction(beta: Scalar, count: torch.Tensor | int) -> torch.Tensor | float:
    r"""``1 - beta**count``, elementwise in float64 on the count's device.

    Computed from the step tensor, never ``.item()``, so it traces under compile and vmap.
    A count already read on the host (a Python ``int``, see :func:`step_counts`) gives a
    Python float, torch.optim's own ``1 - beta ** step`` (a 0-d float64 tensor for a
    tensor ``beta``).

    Args:
        beta: :math:`\beta`, a decay rate (a number or a 0-d tensor).
        count: the step :math:`t`, an integer tensor (any shape: one step per leaf, say),
            or a Python ``int``.

    Returns:
        ``1 - beta**count``: a float64 tensor on ``count``'s device; for an ``int`` count,
        a float (a 0-d float64 tensor for a tensor ``beta``).

    Example:
        >>> import torch
        >>> from holotx.transforms import bias_correction
        >>> bias_correction(0.9, torch.tensor([1, 2]))
        tensor([0.1000, 0.1900], dtype=torch.float64)

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
        https://arxiv.org/abs/1412.6980 (Algorithm 1's bias corrections).
    """
    if isinstance(count, int):  # (read on the host: see step_counts)
        if isinstance(beta, torch.Tensor):
            return 1 - torch.pow(beta.to(scalar_dtype(beta.device)), count)
        return 1.0 - beta ** count  # (a float for an int beta, 0, too)
    t = count.to(scalar_dtype(count.device))
    return 1 - torch.pow(beta, t)


def step_counts(counts: ops.TensorList, *, host: bool = False) -> tuple[ops.TensorList, torch.Tensor | int]:
    """Each leaf's count plus one (the counts replaced), and the new counts stacked into
    one 1-D tensor, so per-leaf scalars (bias corrections) are computed in one vectorized op.

    ``host=True``, for a rule whose per-step scalars also take a Python ``int`` count
    (:func:`bias_correction`, :func:`corrected_denominator`, given hyperparameters that are
    numbers, see :func:`numbers`): where reading the counts costs
    no device sync (plain eager on a CPU) and every leaf has the same one (the usual case),
    that count as an ``int``. The scalars are then Python floats computed as torch.optim
    computes them, where a tensor formula costs a dozen tiny ops per step (a quarter of an
    AdamW step on a small model)."""
    counts = ops.add_scalar_(counts, 1)
    if host and ops.host_scalars_ok(counts):
        first = counts[0].item()
        # (counts of another dtype, a state converted to floats, keep the tensor formula)
        if type(first) is int and all(c.item() == first for c in counts):
            return counts, first
    return counts, torch.stack(counts)


def numbers(*values: object) -> bool:
    """Whether every value is a Python number (a hyperparameter given as a tensor, which
    may need a gradient, keeps the per-step scalars tensors: see :func:`step_counts`)."""
    return all(isinstance(v, (int, float)) for v in values)


def corrected_denominator(b1: Scalar, b2: Scalar, eps: Scalar,
                          t: torch.Tensor | int) -> tuple[Scalar, Scalar]:
    r"""Adam's bias-corrected denominator as ``(scale, shift)`` for :func:`adaptive_ratio`,
    per leaf (:func:`per_leaf`), with the first correction folded in:
    :math:`\frac{m/(1-\beta_1^t)}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    = \frac{m}{\sqrt{v}\,a + b}`, :math:`a = (1-\beta_1^t)/\sqrt{1-\beta_2^t}`,
    :math:`b = \epsilon(1-\beta_1^t)` (one pass over memory fewer than dividing
    :math:`m`; results change by rounding only)."""
    if isinstance(t, int) and not numbers(b1, b2, eps):
        t = torch.tensor(t)  # (a hyperparameter given as a tensor: the tensor formula)
    bc1 = bias_correction(b1, t)
    bc2 = bias_correction(b2, t)
    return per_leaf(bc1 / square_root(bc2), eps * bc1)


def square_root(x: torch.Tensor | float) -> torch.Tensor | float:
    """``torch.sqrt`` of a tensor, ``math.sqrt`` of a number (a per-step scalar computed on
    the host, see :func:`step_counts`): both correctly rounded, so the same value."""
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def per_leaf(*vectors: torch.Tensor | float) -> tuple[list[torch.Tensor] | list[float] | float, ...]:
    """Per-leaf scalars: each 1-D vector (one value per leaf) as a list, one per leaf; a
    number (computed from a count read on the host, see :func:`step_counts`) as it is.

    Traced (compile, functorch) or on an accelerator, a list of 0-d tensors, realized once
    per step under compile (see :func:`per_step_scalars`). In plain eager mode on the CPU,
    where reading a value costs no device sync, Python floats, as torch.optim's own
    non-capturable path uses: the foreach ``ScalarList`` kernels take them, where a 0-d
    tensor per leaf costs a broadcast per leaf (10 ms a step on 1000 leaves).
    """
    if numbers(*vectors):
        return vectors  # (one number for every leaf, from a count read on the host)
    if ops.host_scalars_ok(vectors):
        return tuple(v.tolist() for v in vectors)
    return tuple(list(v.unbind(0)) for v in per_step_scalars(*vectors))


def per_step_scalars(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same 0-d tensors, computed once per step under ``torch.compile``.

    Inductor inlines a 0-d computation into every consumer, so a bias correction ends up
    recomputed (a float64 ``pow``) for each vector of every elementwise loop: +80% time
    on an AdamW step. Stacking realizes them into one small buffer computed before the
    loop. In eager mode this costs one tiny op.
    """
    return tuple(torch.stack(scalars).unbind(0))


def moments(g: ops.TensorList, mu: ops.TensorList, nu: ops.TensorList, b1: Scalar,
            b2: Scalar) -> tuple[ops.TensorList, ops.TensorList]:
    r"""Adam's moment EMAs, the moments replaced: :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`, as ``torch.optim.Adam`` computes them."""
    mu = ops.lerp_(mu, g, 1 - b1)
    nu = ops.mul_(nu, b2)
    return mu, ops.addcmul_(nu, g, g, 1 - b2)


def adaptive_ratio(mu: ops.TensorList, nu: ops.TensorList, scale: Scalar, shift: Scalar, *,
                   dead: ops.TensorList | None = None) -> ops.TensorList:
    r""":math:`m / (\sqrt{v}\, a + b)`. The denominator is a scratch buffer the quotient
    is written into: ``dead`` if given (values no longer needed, e.g. incoming updates
    already read), else a fresh one."""
    denom = ops.sqrt(nu) if dead is None else ops.sqrt_into(nu, dead)
    denom = ops.mul_(denom, scale)
    denom = ops.add_scalar_(denom, shift)
    return ops.div_into(mu, denom)


def scale_by_adam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    amsgrad: bool = False,
    bias_correction: bool = True,
) -> GradientTransformation:
    r"""Rescale updates by Adam's bias-corrected moments (Kingma & Ba, 2015).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \hat v_t = \max(\hat v_{t-1}, v_t)\ \text{(amsgrad)}

        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    where :math:`t` counts the steps each leaf has taken (a leaf whose gradient is
    ``None`` keeps its state, count included, as torch.optim skips such a parameter)

    with ``eps`` outside the square root, as in ``torch.optim.Adam``; the bias
    corrections are computed in float64 from the step count (the first one is folded into
    the denominator, which changes results by rounding only). Defaults ``(0.9, 0.999,
    1e-8)``. ``bias_correction=False`` leaves the moments uncorrected,
    :math:`u_t = m_t / (\sqrt{v_t} + \epsilon)` (Holocron's LAMB). State:
    :class:`ScaleByAdamState`.

    Args:
        b1: :math:`\beta_1`, the decay rate of the first moment (default ``0.9``).
        b2: :math:`\beta_2`, the decay rate of the second moment (default ``0.999``).
        eps: :math:`\epsilon`, added to :math:`\sqrt{v_t}/\sqrt{1-\beta_2^t}` (default ``1e-8``).
        amsgrad: use :math:`\hat v_t`, the running maximum of :math:`v_t` (AMSGrad; default ``False``).
        bias_correction: divide the moments by :math:`1-\beta^t` (default ``True``; ``False`` is
            Holocron's LAMB).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByAdamState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_adam()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 1.0000,  1.0000, -1.0000])

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
        https://arxiv.org/abs/1412.6980.
    """
    _validate.in_unit_interval("b1", b1)
    _validate.in_unit_interval("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.flag("amsgrad", amsgrad)
    corrected = _validate.flag("bias_correction", bias_correction)

    def init(params):
        return ScaleByAdamState(
            count=init_counts(params),
            mu=zeros_like(params),
            nu=zeros_like(params),
            nu_max=zeros_like(params) if amsgrad else None,
        )

    def update(updates, state, params=None, **extra):
        del params, extra

        def kernel(g, count, mu, nu, nu_max, _p):
            count, t = step_counts(count, host=numbers(b1, b2, eps))
            if corrected:
                scale, shift = corrected_denominator(b1, b2, eps, t)
            else:
                scale, shift = 1, eps
            mu, nu = moments(g, mu, nu, b1, b2)
            if nu_max is not None:
                nu_max = ops.maximum_(nu_max, nu)
            u = adaptive_ratio(mu, nu if nu_max is None else nu_max, scale, shift, dead=g)  # g is read
            return u, count, mu, nu, nu_max

        u, (count, mu, nu, nu_max) = multi_tensor_update(
            kernel, updates, (state.count, state.mu, state.nu, state.nu_max),
            state_names=("state.count", "state.mu", "state.nu", "state.nu_max"), count_states=1,
        )
        return u, ScaleByAdamState(count, mu, nu, nu_max)

    return own_transform(init, update, state_type=ScaleByAdamState,
                         kept_fields={"nu_max": (amsgrad, f"amsgrad={amsgrad}")})
