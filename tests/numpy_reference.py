"""Plain float64 NumPy implementations of the optimizers of eight papers, for reference tests.

Each class is written from its paper's update rule and the paper's official code (which fixes
the details a paper leaves open: where ``eps`` goes, how weight decay enters, bias
corrections), with the choices documented for holotx's default mode (``compat=None``):

=============  ==========================================================================
``LARS``       You, Gitman & Ginsburg 2017, trust ratio ``eta * phi(||w||) / (||g|| + wd ||w||)``
``LAMB``       You et al. 2020, bias-corrected Adam direction scaled by ``phi(||w||) / ||u||``
``RaLars``     LAMB's trust ratio over RAdam's rectified direction (Liu et al. 2020), ``rho_t > 4``
``TAdam``      Ilboudo, Kobayashi & Sugimoto 2020 (Student-t weighted first moment)
``AdaBelief``  Zhuang et al. 2020 (EMA of ``(g - m)^2``, ``eps`` added inside it every step)
``AdamP``      Heo et al. 2021 (projection of the update off the weight direction)
``Adan``       Xie et al. 2022 (Nesterov-style gradient difference, proximal weight decay)
``AdEMAMix``   Pagliardini, Ablin & Grangier 2024 (fast + slow EMA, alpha / beta3 warm-up)
=============  ==========================================================================

Nothing here is vectorised or fused: one parameter at a time, one line per equation, Python
floats for every scalar, so that each line can be read against the paper. Every optimizer
keeps, per parameter, a dict whose keys are the names of the matching holotx state fields
(``count``, ``mu``, ``nu``, ...), so that a test can compare the two field by field; the
paper's own names are given in comments. A ``None`` gradient skips its parameter, as in
torch.optim. ``events`` records which branches ran (a clipped trust ratio, the rectified RAdam
step, AdamP's channel or layer projection, the warm-up phase), so that a test can check that
its inputs exercised them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["LAMB", "LARS", "REFERENCES", "AdEMAMix", "AdaBelief", "AdamP", "Adan", "RaLars", "TAdam"]


def norm(x: np.ndarray) -> float:
    """Euclidean norm of all the entries of ``x`` (0 for an empty array)."""
    return math.sqrt(float(np.sum(x * x)))


class Reference:
    """Per-parameter loop shared by the references: ``step`` advances each parameter's count,
    then hands ``(param, grad, state)`` to ``update_param``, which returns the new param."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.params = {k: np.array(v, dtype=np.float64, copy=True) for k, v in params.items()}
        self.state: dict[str, dict[str, Any]] = {k: self.init_state(v) for k, v in self.params.items()}
        self.events: set[str] = set()

    def init_state(self, p: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def update_param(self, p: np.ndarray, g: np.ndarray, st: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def step(self, grads: dict[str, np.ndarray | None]) -> None:
        """One step; a ``None`` gradient skips its parameter (no update, state and count kept)."""
        for k, g in grads.items():
            if g is None:
                continue
            st = self.state[k]
            st["count"] += 1
            self.params[k] = self.update_param(self.params[k], np.array(g, dtype=np.float64), st)

    def clamp_norm(self, x: float, lo: float, hi: float) -> float:
        """``phi(x) = min(max(x, lo), hi)``, recording when it clips."""
        if x < lo:
            self.events.add("clip_low")
        if x > hi:
            self.events.add("clip_high")
        return min(max(x, lo), hi)


# ------------------------------------------------------------------------------------ LARS

class LARS(Reference):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, Algorithm 1), with SGD momentum.

    local lr ``gamma = eta * phi(||w||) / (||g|| + wd ||w||)`` (``gamma = 1`` when the numerator
    or the denominator is 0), ``phi`` = clamp to ``scale_clip`` (default ``(0, 10)``); the
    direction ``d = g + wd w`` goes through SGD momentum (first buffer = ``d``, undampened) and
    ``w -= lr * gamma * direction``: gamma multiplies the direction, not what enters the buffer.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 scale_clip=None, trust_coefficient=1.0):
        self.lr, self.momentum, self.dampening, self.wd = lr, momentum, dampening, weight_decay
        self.nesterov, self.eta = nesterov, trust_coefficient
        self.lo, self.hi = (0.0, 10.0) if scale_clip is None else scale_clip
        super().__init__(params)

    def init_state(self, p):
        return {"count": 0, "trace": np.zeros_like(p)}

    def update_param(self, p, g, st):
        w_norm, g_norm = norm(p), norm(g)
        phi = self.clamp_norm(w_norm, self.lo, self.hi)
        denom = g_norm + self.wd * w_norm
        gamma = 1.0 if phi == 0 or denom == 0 else self.eta * phi / denom
        d = g + self.wd * p
        if self.momentum > 0:
            if st["count"] == 1:  # v_1 = d
                st["trace"] = d.copy()
            else:  # v_t = m v_{t-1} + (1 - dampening) d
                st["trace"] = self.momentum * st["trace"] + (1 - self.dampening) * d
            d = d + self.momentum * st["trace"] if self.nesterov else st["trace"]
        return p - self.lr * gamma * d


# ------------------------------------------------------------------------------------ LAMB

class LAMB(Reference):
    """LAMB (You et al. 2020, Algorithm 2): Adam's bias-corrected direction
    ``u = m_hat / (sqrt(v_hat) + eps) + wd w``, scaled by ``phi(||w||) / ||u||``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, scale_clip=None):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.lo, self.hi = (0.0, 10.0) if scale_clip is None else scale_clip
        super().__init__(params)

    def init_state(self, p):
        return {"count": 0, "mu": np.zeros_like(p), "nu": np.zeros_like(p), "nu_max": None}

    def moments(self, g, st):
        st["mu"] = self.b1 * st["mu"] + (1 - self.b1) * g  # m_t
        st["nu"] = self.b2 * st["nu"] + (1 - self.b2) * g * g  # v_t

    def trust_step(self, p, u):
        """``u += wd w``; ``w -= lr * phi(||w||) / ||u|| * u`` (ratio 1 if either norm is 0)."""
        u = u + self.wd * p
        phi = self.clamp_norm(norm(p), self.lo, self.hi)
        u_norm = norm(u)
        ratio = 1.0 if phi == 0 or u_norm == 0 else phi / u_norm
        return p - self.lr * ratio * u

    def update_param(self, p, g, st):
        self.moments(g, st)
        t = st["count"]
        bc1, bc2 = 1 - self.b1**t, 1 - self.b2**t
        u = (st["mu"] / bc1) / (np.sqrt(st["nu"]) / math.sqrt(bc2) + self.eps)
        return self.trust_step(p, u)


class RaLars(LAMB):
    """RAdam's direction (Liu et al. 2020) under LAMB's trust ratio.

    ``rho_inf = 2 / (1 - b2) - 1``, ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``; when
    ``rho_t > 4`` the adaptive direction is multiplied by the rectifier
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``, else
    the un-adapted ``m_hat`` is used (or the unrectified adaptive one, when forced).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 force_adaptive_momentum=False, scale_clip=None):
        self.force = force_adaptive_momentum
        super().__init__(params, lr, betas, eps, weight_decay, scale_clip)

    def update_param(self, p, g, st):
        self.moments(g, st)
        t = st["count"]
        bc1, bc2 = 1 - self.b1**t, 1 - self.b2**t
        m_hat = st["mu"] / bc1
        rho_inf = 2 / (1 - self.b2) - 1
        rho_t = rho_inf - 2 * t * self.b2**t / bc2
        if rho_t > 4:
            self.events.add("rectified")
            r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            u = r_t * m_hat / (np.sqrt(st["nu"] / bc2) + self.eps)
        elif self.force:
            self.events.add("forced_adaptive")
            u = m_hat / (np.sqrt(st["nu"] / bc2) + self.eps)
        else:
            self.events.add("unrectified")
            u = m_hat
        return self.trust_step(p, u)


# ------------------------------------------------------------------------------------ TAdam

class TAdam(Reference):
    """TAdam (Ilboudo et al. 2020, Algorithm 1): the first moment is a Student-t weighted mean.

    With ``d = numel(w)`` and ``nu = d`` unless ``dof`` is given, the weight of the new gradient
    is ``w_t = (nu + d) / (nu + sum((g - m_{t-1})^2 / (v_{t-1} + eps)))``;
    ``m_t = (W m_{t-1} + w_t g) / (W + w_t)`` and ``W <- W (2 b1 - 1) / b1 + w_t`` with
    ``W_0 = b1 / (1 - b1)``; ``v`` is Adam's; the step is Adam's with ``m_t``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 dof=None):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.amsgrad, self.dof = amsgrad, dof
        super().__init__(params)

    def init_state(self, p):
        return {"count": 0, "mu": np.zeros_like(p), "nu": np.zeros_like(p),
                "nu_max": np.zeros_like(p) if self.amsgrad else None,
                "weight_sum": self.b1 / (1 - self.b1)}  # W_0

    def update_param(self, p, g, st):
        g = g + self.wd * p
        d = p.size
        dof = d if self.dof is None else self.dof
        w_t = (dof + d) / (dof + float(np.sum((g - st["mu"]) ** 2 / (st["nu"] + self.eps))))
        big_w = st["weight_sum"]
        st["mu"] = (big_w * st["mu"] + w_t * g) / (big_w + w_t)
        st["weight_sum"] = big_w * (2 * self.b1 - 1) / self.b1 + w_t
        st["nu"] = self.b2 * st["nu"] + (1 - self.b2) * g * g
        v = st["nu"]
        if self.amsgrad:
            st["nu_max"] = v = np.maximum(st["nu_max"], st["nu"])
        t = st["count"]
        bc1, bc2 = 1 - self.b1**t, 1 - self.b2**t
        return p - (self.lr / bc1) * st["mu"] / (np.sqrt(v) / math.sqrt(bc2) + self.eps)


# ------------------------------------------------------------------------------------ AdaBelief

class AdaBelief(Reference):
    """AdaBelief (Zhuang et al. 2020, Algorithm 2): ``s_t = b2 s + (1 - b2)(g - m_t)^2 + eps``
    (the official code adds ``eps`` into ``s`` in place, every step), then Adam's step with
    ``s`` for ``v``; L2 weight decay coupled into ``g``, or decoupled (``w -= lr wd w``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 decoupled_weight_decay=False):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.amsgrad, self.decoupled = amsgrad, decoupled_weight_decay
        super().__init__(params)

    def init_state(self, p):
        return {"count": 0, "mu": np.zeros_like(p), "nu": np.zeros_like(p),
                "nu_max": np.zeros_like(p) if self.amsgrad else None}

    def update_param(self, p, g, st):
        if not self.decoupled:
            g = g + self.wd * p
        st["mu"] = self.b1 * st["mu"] + (1 - self.b1) * g  # m_t
        st["nu"] = self.b2 * st["nu"] + (1 - self.b2) * (g - st["mu"]) ** 2 + self.eps  # s_t
        s = st["nu"]
        if self.amsgrad:
            st["nu_max"] = s = np.maximum(st["nu_max"], st["nu"])
        t = st["count"]
        bc1, bc2 = 1 - self.b1**t, 1 - self.b2**t
        u = (st["mu"] / bc1) / (np.sqrt(s) / math.sqrt(bc2) + self.eps)
        if self.decoupled:
            u = u + self.wd * p
        return p - self.lr * u


# ------------------------------------------------------------------------------------ AdamP

def cosine(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """``<x, y> / (max(||x||, eps) max(||y||, eps))``."""
    return float(np.sum(x * y)) / (max(norm(x), eps) * max(norm(y), eps))


class AdamP(Reference):
    """AdamP (Heo et al. 2021, Algorithm 2, with the official code's details).

    Adam's perturbation ``p_t = m_t / (sqrt(v_hat) + eps)`` (Nesterov: ``b1 m_t + (1 - b1) g``
    for ``m_t``). For weights of two or more dimensions, if the gradient is nearly orthogonal
    to the weight -- first per output channel (every row of ``w.view(w.shape[0], -1)``,
    ``max |cos| < delta / sqrt(row length)``), else as a whole (``|cos| < delta / sqrt(numel)``)
    -- the radial part of ``p_t`` is removed in that view, ``p_t -= n <n, p_t>`` with
    ``n = w / (||w|| + eps)``, and decoupled weight decay is scaled by ``wd_ratio``.
    ``w -= lr (p_t / bc1 + decay)``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 delta=0.1, wd_ratio=0.1, nesterov=False, decoupled_weight_decay=False):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.amsgrad, self.delta, self.wd_ratio = amsgrad, delta, wd_ratio
        self.nesterov, self.decoupled = nesterov, decoupled_weight_decay
        self.margin = math.inf  # closest relative distance of a cosine to its threshold
        super().__init__(params)

    def init_state(self, p):
        return {"count": 0, "mu": np.zeros_like(p), "nu": np.zeros_like(p),
                "nu_max": np.zeros_like(p) if self.amsgrad else None}

    def below(self, cos: float, threshold: float) -> bool:
        self.margin = min(self.margin, abs(cos - threshold) / threshold)
        return cos < threshold

    def project(self, p, g, perturb):
        """Returns ``(perturb, projected)``."""
        rows = p.shape[0]
        w_rows, g_rows = p.reshape(rows, -1), g.reshape(rows, -1)
        row_len = w_rows.shape[1]
        cos_max = max(abs(cosine(g_rows[i], w_rows[i], self.eps)) for i in range(rows))
        if self.below(cos_max, self.delta / math.sqrt(row_len)):
            self.events.add("channel_projection")
            out = perturb.reshape(rows, -1).copy()
            for i in range(rows):
                n = w_rows[i] / (norm(w_rows[i]) + self.eps)
                out[i] = out[i] - n * float(np.sum(n * out[i]))
            return out.reshape(p.shape), True
        if self.below(abs(cosine(g.ravel(), p.ravel(), self.eps)), self.delta / math.sqrt(p.size)):
            self.events.add("layer_projection")
            n = p / (norm(p) + self.eps)
            return perturb - n * float(np.sum(n * perturb)), True
        self.events.add("no_projection")
        return perturb, False

    def update_param(self, p, g, st):
        if not self.decoupled:
            g = g + self.wd * p
        st["mu"] = self.b1 * st["mu"] + (1 - self.b1) * g
        st["nu"] = self.b2 * st["nu"] + (1 - self.b2) * g * g
        v = st["nu"]
        if self.amsgrad:
            st["nu_max"] = v = np.maximum(st["nu_max"], st["nu"])
        t = st["count"]
        bc1, bc2 = 1 - self.b1**t, 1 - self.b2**t
        denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
        m = self.b1 * st["mu"] + (1 - self.b1) * g if self.nesterov else st["mu"]
        perturb = m / denom
        projected = False
        if p.ndim > 1:
            perturb, projected = self.project(p, g, perturb)
        decay = 0.0
        if self.decoupled:
            decay = self.wd * (self.wd_ratio if projected else 1.0) * p
        return p - self.lr * (perturb / bc1 + decay)


# ------------------------------------------------------------------------------------ Adan

class Adan(Reference):
    """Adan (Xie et al. 2022, Algorithm 1, official code without restart or clipping).

    ``diff = g - g_prev`` (``g_prev = g`` on the first step, so ``diff_1 = 0``);
    ``m = EMA_b1(g)``, ``v = EMA_b2(diff)``, ``n = EMA_b3((g + b2 diff)^2)`` with
    ``EMA_b(x) = b old + (1 - b) x``; ``u = (m_hat + b2 v_hat) / (sqrt(n_hat) + eps)``;
    proximal weight decay ``w = (w - lr u) / (1 + lr wd)``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, amsgrad=False):
        self.lr, (self.b1, self.b2, self.b3), self.eps, self.wd = lr, betas, eps, weight_decay
        self.amsgrad = amsgrad
        super().__init__(params)

    def init_state(self, p):
        return {"count": 0, "mu": np.zeros_like(p), "diff_avg": np.zeros_like(p), "nu": np.zeros_like(p),
                "nu_max": np.zeros_like(p) if self.amsgrad else None, "prev_grad": np.zeros_like(p)}

    def update_param(self, p, g, st):
        prev = g if st["count"] == 1 else st["prev_grad"]  # g_0 = g_1: no difference on step 1
        diff = g - prev
        st["mu"] = self.b1 * st["mu"] + (1 - self.b1) * g  # m_k
        st["diff_avg"] = self.b2 * st["diff_avg"] + (1 - self.b2) * diff  # v_k
        z = g + self.b2 * diff
        st["nu"] = self.b3 * st["nu"] + (1 - self.b3) * z * z  # n_k
        n = st["nu"]
        if self.amsgrad:
            st["nu_max"] = n = np.maximum(st["nu_max"], st["nu"])
        st["prev_grad"] = g.copy()
        t = st["count"]
        bc1, bc2, bc3 = 1 - self.b1**t, 1 - self.b2**t, 1 - self.b3**t
        u = (st["mu"] / bc1 + self.b2 * st["diff_avg"] / bc2) / (np.sqrt(n) / math.sqrt(bc3) + self.eps)
        return (p - self.lr * u) / (1 + self.lr * self.wd)


# ------------------------------------------------------------------------------------ AdEMAMix

def _half_life_exponent(beta: float) -> float:
    """The paper's ``f(beta) = ln(0.5) / ln(beta + 1e-8) - 1`` (number of steps to half weight)."""
    return math.log(0.5) / math.log(beta + 1e-8) - 1


def _beta_from_exponent(x: float) -> float:
    """Inverse of ``_half_life_exponent`` (without the 1e-8): ``0.5 ** (1 / (x + 1))``."""
    return 0.5 ** (1 / (x + 1))


class AdEMAMix(Reference):
    """AdEMAMix (Pagliardini et al. 2024, Algorithm 1): Adam plus a slow, not bias-corrected EMA
    ``m2 = EMA_b3(g)`` mixed in with weight ``alpha``:
    ``w -= lr ((m1_hat + alpha m2) / (sqrt(nu_hat) + eps) + wd w)``.

    With ``t_alpha_beta3 = T``, for ``t < T``: ``alpha_t = alpha t / T`` (linear) and ``beta3_t``
    interpolates linearly in half-life space from ``b1`` to ``b3``; from ``t = T`` on the final
    values. Weight decay is coupled L2 unless ``decoupled_weight_decay``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8, weight_decay=0.0,
                 t_alpha_beta3=None, decoupled_weight_decay=False):
        self.lr, (self.b1, self.b2, self.b3), self.alpha = lr, betas, alpha
        self.eps, self.wd, self.warmup = eps, weight_decay, t_alpha_beta3
        self.decoupled = decoupled_weight_decay
        super().__init__(params)

    def init_state(self, p):
        return {"count": 0, "mu": np.zeros_like(p), "nu": np.zeros_like(p), "mu_slow": np.zeros_like(p)}

    def schedules(self, t: int) -> tuple[float, float]:
        """``(alpha_t, beta3_t)``."""
        if self.warmup is None or t >= self.warmup:
            self.events.add("final_alpha_beta3")
            return self.alpha, self.b3
        self.events.add("warmup")
        a = t / self.warmup
        beta3 = _beta_from_exponent((1 - a) * _half_life_exponent(self.b1) + a * _half_life_exponent(self.b3))
        return self.alpha * a, beta3

    def update_param(self, p, g, st):
        if not self.decoupled:
            g = g + self.wd * p
        t = st["count"]
        alpha_t, beta3_t = self.schedules(t)
        st["mu"] = self.b1 * st["mu"] + (1 - self.b1) * g  # m1
        st["nu"] = self.b2 * st["nu"] + (1 - self.b2) * g * g  # nu
        st["mu_slow"] = beta3_t * st["mu_slow"] + (1 - beta3_t) * g  # m2
        bc1, bc2 = 1 - self.b1**t, 1 - self.b2**t
        u = (st["mu"] / bc1 + alpha_t * st["mu_slow"]) / (np.sqrt(st["nu"]) / math.sqrt(bc2) + self.eps)
        if self.decoupled:
            u = u + self.wd * p
        return p - self.lr * u


REFERENCES: dict[str, type[Reference]] = {
    "lars": LARS,
    "lamb": LAMB,
    "ralars": RaLars,
    "tadam": TAdam,
    "adabelief": AdaBelief,
    "adamp": AdamP,
    "adan": Adan,
    "ademamix": AdEMAMix,
}
