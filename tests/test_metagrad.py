r"""Meta-gradients through K holotx updates, checked against central finite differences.

The meta-objective (MAML-style, a closed loop): from the initial params
:math:`\theta_0`, K = 3 steps of an optimizer on an inner loss whose gradient
:math:`g_t = \nabla L_{in}(\theta_t)` is itself taken with ``torch.func.grad`` (so the
inner Hessian enters the meta-gradient), then an outer loss of :math:`\theta_K`:

.. math:: M(\theta_0, \eta) = L_{out}(\theta_K),\qquad
    \theta_{t+1} = \theta_t + u_t(g_t, s_t, \theta_t; \eta)

:math:`L_{in}` is a tanh regression on fixed data (nonlinear in the params: second-order
terms matter), :math:`L_{out}` a different quadratic (a linear regression on other data
plus a ridge term). ``torch.func.grad(M)`` with respect to :math:`\theta_0`, to the
learning rate :math:`\eta` (given to the factory as a 0-d tensor, or injected with
``inject_hyperparams`` and set into the state), to ``betas`` and to a wrapper's
``sync_rate`` must equal central finite differences in float64, for every optimizer (in
its default and ``compat="holocron"`` modes) and for Lookahead and Scout around a couple of
inner optimizers.

Tolerance (see :func:`assert_close_to_fd`): per coordinate,
:math:`|auto - fd| \le 10^{-6}|fd| + 10^{-7}\max|fd|`. The finite differences are the
fourth-order central stencil with :math:`h = 10^{-4}` (relative to the value for a
hyperparameter: :math:`5\cdot 10^{-6}` for lr = 0.05). It errs by about
:math:`h^4|M^{(5)}|/30 \approx 10^{-17}|M^{(5)}|` of truncation plus
:math:`1.5\,\epsilon_{64}|M|/h \approx 10^{-11}|M|` of rounding (for lr, :math:`10^{-10}|M|`);
with :math:`|M| \approx 2.6` and the smallest derivative checked about :math:`3\cdot
10^{-3}` (TAdam's d/dlr: its first step is tiny), that is below :math:`10^{-7}` of the
derivative, the worst seen being about 3e-8 relative to the gradient's largest entry. (A
second-order stencil with :math:`h = 10^{-6}` is not enough here: its rounding error,
:math:`\epsilon_{64}|M|/h`, reaches 4e-7 of TAdam's d/dlr.) A missing or wrong derivative
term is O(1) off.

Evaluation points are chosen so that every algorithm is smooth there, and stays so within
the FD perturbation: every param entry starts with :math:`|\theta| \ge 0.5` and no gradient
entry is near zero (Adam-like :math:`\sqrt{v}` at step 1 is :math:`|g|`); tensor norms are
inside LAMB/LARS/RaLars's ``scale_clip`` (0, 10), or, in the ``lamb-clip`` case, strictly
above a small upper clip (clamp active: its derivative is 0, not a kink); AdamP's
projection test :math:`|\cos| < \delta/\sqrt{\dim}` is made always true (``delta=10``,
:math:`|\cos| \le 1`) or always false (``delta=0``, official mode); RAdam's rectification
threshold depends on the step count and :math:`\beta_2` only (never on params or lr), so
it cannot flip: within K = 3 it is inactive (:math:`\rho_t \le 3`), and extra K = 6 cases
cross it (step 5 for RaLars's threshold 4, step 6 for RAdam's 5); AMSGrad's
:math:`\max(v_{max}, v)` is never tied for these data (checked by the FD match itself: a
tie is an O(1) kink).

Scout: with ``sync_period=2`` its coherence ratio is :math:`\sqrt 2` for every element,
so its rate is ``max(1 - sqrt 2, sync_rate) = sync_rate``, whatever the params. Its
Holocron mode detaches the rate *by design* (Holocron's rate is a Python float), so:
w.r.t. the initial params it still equals FD at ``sync_period=2`` (the rate does not
depend on them); w.r.t. a tensor ``sync_rate`` its meta-gradient is exactly 0 (while FD is
not); and with ``sync_period=3`` and a small ``sync_rate`` (the coherence rate
:math:`1 - C` is then the one used, and depends on the params) the default mode equals FD,
while the Holocron mode equals FD of Lookahead run with Scout's rate frozen at its value
(a constant rate is what a detached rate means).

``holotx.tree.detach(state)`` between steps (first-order meta-learning) is checked against
FD of a loop that replays the unperturbed run's optimizer states as constants, and:
it differs from the full meta-gradient for Adam, equals it for K = 1 and for stateless SGD.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.func import grad, vmap

import holotx

F64 = torch.float64
K = 3
LR = 0.05
H = 1e-4
RTOL = 1e-6
ATOL = 1e-7  # relative to the largest |fd| entry

# Worst |auto - fd| / max|fd| per case, for the record (read by whoever runs the module).
FD_ERRORS: dict[str, float] = {}


# ------------------------------------------------------------------ problem


def make_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = (0.5 + 0.5 * torch.rand(3, 2, generator=g, dtype=F64)) * torch.tensor([[1.0, -1.0], [-1.0, 1.0],
                                                                              [1.0, 1.0]], dtype=F64)
    b = torch.tensor([0.6, -0.7], dtype=F64)
    return {"w": w, "b": b}


def make_data(seed: int = 1, batch: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """(X, Y) for the inner loss, (Xv, Yv) for the outer one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, 8, 3, generator=g, dtype=F64)
    y = 0.8 * torch.tanh(torch.randn(*batch, 8, 2, generator=g, dtype=F64))
    xv = torch.randn(*batch, 6, 3, generator=g, dtype=F64)
    yv = torch.randn(*batch, 6, 2, generator=g, dtype=F64)
    return x, y, xv, yv


def inner_loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = data[0], data[1]
    return ((torch.tanh(x @ params["w"] + params["b"]) - y) ** 2).mean()


def outer_loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    xv, yv = data[2], data[3]
    return ((xv @ params["w"] + params["b"] - yv) ** 2).mean() + 0.1 * (params["w"] ** 2).sum()


PARAMS0 = make_params()
DATA = make_data()


def unroll(tx: holotx.GradientTransformation, params: dict[str, torch.Tensor],
           data: tuple[torch.Tensor, ...] = DATA, steps: int = K, *,
           setup: Callable[[Any], Any] | None = None,
           between: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """The outer loss after ``steps`` closed-loop steps. ``setup`` edits the initial state
    (to set injected hyperparameters), ``between`` the state after each step."""
    state = tx.init(params)
    if setup is not None:
        state = setup(state)
    for _ in range(steps):
        updates, state = tx.update(grad(inner_loss)(params, data), state, params)
        params = holotx.apply_updates(params, updates)
        if between is not None:
            state = between(state)
    return outer_loss(params, data)


# ---------------------------------------------------------- finite differences


def flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def central_difference(f: Callable[[float], float], h: float) -> float:
    """The fourth-order central difference
    :math:`(f(-2h) - 8f(-h) + 8f(h) - f(2h)) / 12h` of ``f`` at 0."""
    return (f(-2 * h) - 8 * f(-h) + 8 * f(h) - f(2 * h)) / (12 * h)


def fd_params(loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
              params: dict[str, torch.Tensor] = PARAMS0) -> torch.Tensor:
    """Finite differences of ``loss`` w.r.t. every param entry (order of :func:`flat`)."""
    out = []
    for key in sorted(params):
        for j in range(params[key].numel()):
            def shifted(delta: float, key: str = key, j: int = j) -> float:
                x = params[key].clone().reshape(-1)
                x[j] += delta
                return loss({**params, key: x.reshape(params[key].shape)}).item()

            out.append(central_difference(shifted, H))
    return torch.tensor(out, dtype=F64)


def fd_scalar(loss: Callable[[torch.Tensor], torch.Tensor], value: float) -> torch.Tensor:
    """Finite difference w.r.t. a scalar, with a step relative to its value."""
    h = H * max(abs(value), 1e-2)
    return torch.tensor([central_difference(lambda d: loss(torch.tensor(value + d, dtype=F64)).item(), h)],
                        dtype=F64)


def assert_close_to_fd(auto: torch.Tensor, fd: torch.Tensor, what: str) -> None:
    auto, fd = auto.reshape(-1).detach(), fd.reshape(-1)
    assert torch.isfinite(auto).all(), f"{what}: non-finite meta-gradient {auto}"
    scale = fd.abs().max().item()
    assert scale > 0, f"{what}: the finite-difference gradient is zero (a degenerate check)"
    err = (auto - fd).abs()
    FD_ERRORS[what] = max(FD_ERRORS.get(what, 0.0), err.max().item() / scale)
    bad = err > RTOL * fd.abs() + ATOL * scale
    if bad.any():
        j = int((err / (RTOL * fd.abs() + ATOL * scale)).argmax())
        raise AssertionError(f"{what}: meta-gradient differs from finite differences at entry {j}: "
                             f"autograd {auto[j].item():.12g}, fd {fd[j].item():.12g} "
                             f"(|diff| {err[j].item():.3e}, scale {scale:.3e})\nauto {auto}\nfd   {fd}")


# ------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[..., holotx.GradientTransformation]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    wrapper: Callable[..., holotx.GradientTransformation] | None = None
    wrap_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = K

    def build(self, lr: Any = LR, *, inject: bool = False) -> holotx.GradientTransformation:
        """The optimizer with ``lr`` given to the factory (a float or 0-d tensor), or,
        with ``inject``, built by ``inject_hyperparams`` (lr then set into the state)."""
        if inject:
            opt = holotx.inject_hyperparams(self.factory)(lr=LR, **self.kwargs)
        else:
            opt = self.factory(lr=lr, **self.kwargs)
        return opt if self.wrapper is None else self.wrapper(opt, **self.wrap_kwargs)


def set_hyperparam(state: Any, name: str, value: Any) -> Any:
    """``state`` with the injected hyperparameter ``name`` set to ``value``, wherever the
    InjectHyperparamsState is (at the top, or inside a wrapper's ``inner_state``)."""
    if isinstance(state, holotx.InjectHyperparamsState):
        return state._replace(hyperparams={**state.hyperparams, name: value})
    return state._replace(inner_state=set_hyperparam(state.inner_state, name, value))


HOLOCRON = {"compat": "holocron"}
OPTIMIZERS = [
    Case("sgd-momentum", holotx.sgd, {"momentum": 0.9}),
    Case("sgd-nesterov", holotx.sgd, {"momentum": 0.9, "nesterov": True}),
    Case("sgd-dampened-wd", holotx.sgd, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05}),
    Case("adam", holotx.adam, {}),
    Case("adam-amsgrad-wd", holotx.adam, {"amsgrad": True, "weight_decay": 0.05}),
    Case("adamw", holotx.adamw, {"weight_decay": 0.1}),
    Case("radam", holotx.radam, {}),
    Case("radam-decoupled", holotx.radam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    Case("lars", holotx.lars, {"momentum": 0.9}),
    Case("lars-wd-holocron", holotx.lars, {"momentum": 0.9, "weight_decay": 0.05, **HOLOCRON}),
    Case("lamb", holotx.lamb, {"weight_decay": 0.05}),
    Case("lamb-holocron", holotx.lamb, {"weight_decay": 0.05, **HOLOCRON}),
    Case("lamb-clip", holotx.lamb, {"scale_clip": (0.0, 0.5)}),
    Case("ralars", holotx.ralars, {}),
    Case("ralars-forced-wd-holocron", holotx.ralars,
         {"force_adaptive_momentum": True, "weight_decay": 0.05, **HOLOCRON}),
    Case("tadam", holotx.tadam, {}),
    Case("tadam-holocron", holotx.tadam, HOLOCRON),
    Case("adabelief", holotx.adabelief, {"weight_decay": 0.05}),
    Case("adabelief-holocron", holotx.adabelief, {"weight_decay": 0.05, **HOLOCRON}),
    Case("adamp-projected", holotx.adamp, {"delta": 10.0, "weight_decay": 0.05}),
    Case("adamp-projected-decoupled-nesterov", holotx.adamp,
         {"delta": 10.0, "weight_decay": 0.1, "decoupled_weight_decay": True, "nesterov": True}),
    Case("adamp-unprojected", holotx.adamp, {"delta": 0.0}),
    Case("adamp-projected-holocron", holotx.adamp, {"delta": 10.0, "weight_decay": 0.05, **HOLOCRON}),
    Case("adan", holotx.adan, {"weight_decay": 0.05}),
    Case("adan-holocron", holotx.adan, {"weight_decay": 0.05, **HOLOCRON}),
    Case("ademamix", holotx.ademamix, {"betas": (0.9, 0.999, 0.99)}),
    Case("ademamix-holocron", holotx.ademamix, {"betas": (0.9, 0.999, 0.99), **HOLOCRON}),
    # RAdam-style rectification switches on within the unroll (step 5 for RaLars, 6 for RAdam).
    Case("radam-k6-rectified", holotx.radam, {}, steps=6),
    Case("ralars-k6-rectified", holotx.ralars, {}, steps=6),
]

INNERS = [("sgd-momentum", holotx.sgd, {"momentum": 0.9}), ("adamw", holotx.adamw, {"weight_decay": 0.1})]
WRAPPERS = [
    Case(f"{wname}{'-holocron' if compat else ''}({iname})", factory, kwargs, wrapper,
         {"sync_rate": 0.5, "sync_period": 2, "compat": compat})
    for wname, wrapper in (("lookahead", holotx.lookahead), ("scout", holotx.scout))
    for compat in (None, "holocron")
    for iname, factory, kwargs in INNERS
] + [
    # Scout's coherence rate 1 - C in use (k = 3, a small floor): differentiable in default mode.
    Case("scout-k3-coherent(adamw)", holotx.adamw, {"weight_decay": 0.1}, holotx.scout,
         {"sync_rate": 0.01, "sync_period": 3}),
    Case("lookahead-k3(lamb)", holotx.lamb, {}, holotx.lookahead, {"sync_rate": 0.3, "sync_period": 3}),
]

ALL = [pytest.param(c, id=c.name) for c in OPTIMIZERS + WRAPPERS]


def test_evaluation_point_is_smooth() -> None:
    r"""The premises of the FD checks, along every case's unperturbed trajectory: the first
    gradient (where Adam-like :math:`\sqrt{v_1} = |g_1|`) has no entry near 0 compared with
    the FD step; tensor norms stay strictly inside LAMB/LARS/RaLars's default clip (0, 10)
    and strictly above ``lamb-clip``'s upper clip 0.5; AMSGrad's running max is never
    close to a tie (the new :math:`v` exceeds the old max by more than 10%)."""
    g1 = grad(inner_loss)(PARAMS0, DATA)
    assert min(x.abs().min().item() for x in g1.values()) > 1e-2
    for case in OPTIMIZERS + WRAPPERS:
        tx, params = case.build(), PARAMS0
        state = tx.init(params)
        for _ in range(case.steps):
            assert min(x.norm().item() for x in params.values()) > 0.6, case.name
            assert max(x.norm().item() for x in params.values()) < 9.0, case.name
            before = holotx.tree.find_states(state, holotx.ScaleByAdamState)
            updates, state = tx.update(grad(inner_loss)(params, DATA), state, params)
            params = holotx.apply_updates(params, updates)
            for old, new in zip(before, holotx.tree.find_states(state, holotx.ScaleByAdamState)):
                if old.nu_max is not None:
                    for key in params:
                        assert (new.nu[key] > 1.1 * old.nu_max[key]).all(), case.name


def test_rectification_switches_on_only_in_the_k6_cases() -> None:
    """RAdam's rectifier depends on the step count and beta2 alone (so no FD perturbation
    of params or lr can flip it): off for steps 1-3, on from step 5 (RaLars, rho_t > 4)
    and step 6 (RAdam, rho_t > 5) with the default beta2."""
    from holotx.transforms.adam import bias_correction
    from holotx.transforms.radam import rectification

    def active(t: int, threshold: float) -> bool:
        count = torch.tensor(t)
        return bool(rectification(0.999, count, bias_correction(0.999, count), threshold)[0])

    assert [active(t, 4.0) for t in range(1, 7)] == [False] * 4 + [True] * 2
    assert [active(t, 5.0) for t in range(1, 7)] == [False] * 5 + [True]


# ------------------------------------------------- 1-2. every optimizer and wrapper


@pytest.mark.parametrize("case", ALL)
def test_wrt_initial_params(case: Case) -> None:
    tx = case.build()

    def meta(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return unroll(tx, p, steps=case.steps)

    assert_close_to_fd(flat(grad(meta)(PARAMS0)), fd_params(meta), f"{case.name} d/dparams0")


@pytest.mark.parametrize("case", ALL)
def test_wrt_lr_given_as_tensor(case: Case) -> None:
    """``factory(lr=lr_tensor)``: holotx factories take a 0-d tensor learning rate."""
    def meta(lr: torch.Tensor) -> torch.Tensor:
        return unroll(case.build(lr), PARAMS0, steps=case.steps)

    auto = grad(meta)(torch.tensor(LR, dtype=F64))
    assert_close_to_fd(auto, fd_scalar(meta, LR), f"{case.name} d/dlr")


@pytest.mark.parametrize("case", ALL)
def test_wrt_lr_injected(case: Case) -> None:
    """``inject_hyperparams(factory)``, the differentiated lr written into the state after
    ``init`` (inside the wrapper's ``inner_state`` for Lookahead and Scout)."""
    tx = case.build(inject=True)

    def meta(lr: torch.Tensor) -> torch.Tensor:
        return unroll(tx, PARAMS0, steps=case.steps, setup=lambda s: set_hyperparam(s, "lr", lr))

    lr0 = torch.tensor(LR, dtype=F64)
    auto = grad(meta)(lr0)
    assert_close_to_fd(auto, fd_scalar(meta, LR), f"{case.name} d/dlr (injected)")
    # The two ways of passing a tensor lr are one computation.
    direct = grad(lambda lr: unroll(case.build(lr), PARAMS0, steps=case.steps))(lr0)
    torch.testing.assert_close(auto, direct, rtol=1e-12, atol=0)


BETA_CASES = [
    ("adam", holotx.adam, {}, 0),
    ("adam", holotx.adam, {}, 1),
    ("adamw", holotx.adamw, {"weight_decay": 0.1}, 0),
    ("lamb", holotx.lamb, {"weight_decay": 0.05}, 0),
    ("adabelief", holotx.adabelief, {}, 0),
    ("tadam", holotx.tadam, {}, 0),
    ("adan", holotx.adan, {}, 0),
    ("ademamix", holotx.ademamix, {"betas": (0.9, 0.999, 0.99)}, 2),
    ("adamp-projected", holotx.adamp, {"delta": 10.0}, 0),
]


@pytest.mark.parametrize(("name", "factory", "kwargs", "index"), BETA_CASES,
                         ids=[f"{c[0]}-betas[{c[3]}]" for c in BETA_CASES])
def test_wrt_betas_injected(name: str, factory: Callable[..., Any], kwargs: dict[str, Any],
                            index: int) -> None:
    betas0 = kwargs.get("betas", (0.9, 0.999) if factory is not holotx.adan else (0.98, 0.92, 0.99))
    tx = holotx.inject_hyperparams(factory)(lr=LR, **{**kwargs, "betas": betas0})

    def meta(beta: torch.Tensor) -> torch.Tensor:
        def setup(state: Any) -> Any:
            betas = list(state.hyperparams["betas"])
            betas[index] = beta
            return set_hyperparam(state, "betas", tuple(betas))
        return unroll(tx, PARAMS0, setup=setup)

    value = betas0[index]
    auto = grad(meta)(torch.tensor(value, dtype=F64))
    assert_close_to_fd(auto, fd_scalar(meta, value), f"{name} d/dbetas[{index}]")


def test_wrt_lr_and_params_jointly() -> None:
    """``argnums=(0, 1)``: both meta-gradients in one call equal their separate values."""
    case = OPTIMIZERS[4]  # adam, amsgrad, weight decay
    meta = lambda p, lr: unroll(case.build(lr), p)
    lr0 = torch.tensor(LR, dtype=F64)
    g_p, g_lr = grad(meta, argnums=(0, 1))(PARAMS0, lr0)
    torch.testing.assert_close(flat(g_p), flat(grad(meta)(PARAMS0, lr0)), rtol=1e-12, atol=0)
    torch.testing.assert_close(g_lr, grad(meta, argnums=1)(PARAMS0, lr0), rtol=1e-12, atol=0)


# ------------------------------------------------------------- wrappers' rates


SYNC_INNERS = [pytest.param(f, kw, id=n) for n, f, kw in INNERS]


@pytest.mark.parametrize(("factory", "kwargs"), SYNC_INNERS)
@pytest.mark.parametrize("compat", [None, "holocron"])
@pytest.mark.parametrize("how", ["tensor", "injected"])
def test_lookahead_wrt_sync_rate(factory: Callable[..., Any], kwargs: dict[str, Any], compat: str | None,
                                 how: str) -> None:
    """``lookahead(inner, sync_rate=rate_tensor)``, or ``inject_hyperparams(lookahead)``
    (``sync_period`` static) with the rate set into the state."""
    inner = factory(lr=LR, **kwargs)
    if how == "injected":
        tx = holotx.inject_hyperparams(holotx.lookahead, static_args=("sync_period",))(
            inner, sync_rate=0.5, sync_period=2, compat=compat)

        def meta(rate: torch.Tensor) -> torch.Tensor:
            return unroll(tx, PARAMS0, setup=lambda s: set_hyperparam(s, "sync_rate", rate))
    else:
        def meta(rate: torch.Tensor) -> torch.Tensor:
            return unroll(holotx.lookahead(inner, sync_rate=rate, sync_period=2, compat=compat), PARAMS0)

    auto = grad(meta)(torch.tensor(0.5, dtype=F64))
    assert_close_to_fd(auto, fd_scalar(meta, 0.5), f"lookahead-{compat}({how}) d/dsync_rate")


@pytest.mark.parametrize(("factory", "kwargs"), SYNC_INNERS)
def test_scout_wrt_sync_rate(factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Default mode: at ``sync_period=2`` the rate is ``sync_rate`` itself, differentiable.
    Holocron mode detaches the rate by design (Holocron's is a Python float): the
    meta-gradient w.r.t. it is exactly zero, although the loss does depend on it."""
    inner = factory(lr=LR, **kwargs)

    def meta(rate: torch.Tensor, compat: str | None = None) -> torch.Tensor:
        return unroll(holotx.scout(inner, sync_rate=rate, sync_period=2, compat=compat), PARAMS0)

    rate0 = torch.tensor(0.5, dtype=F64)
    fd = fd_scalar(meta, 0.5)
    assert_close_to_fd(grad(meta)(rate0), fd, "scout d/dsync_rate")
    holocron = grad(lambda r: meta(r, "holocron"))(rate0)
    assert holocron.item() == 0.0
    assert abs(fd.item()) > 1e-3  # so the zero above is the detachment, not a flat loss
    assert meta(rate0, "holocron").item() == pytest.approx(meta(rate0).item(), rel=1e-12)


def test_scout_holocron_rate_is_frozen() -> None:
    """Holocron-mode Scout with the coherence rate in use (k = 3, tiny floor): the rate
    depends on the params but is detached, so the meta-gradient w.r.t. the initial params
    is that of Lookahead whose rate is frozen at the value Scout computed, checked by FD of
    that Lookahead; and it differs from FD of Scout itself (the rate's path is cut)."""
    inner = holotx.adamw(lr=LR, weight_decay=0.1)
    scout = holotx.scout(inner, sync_rate=0.01, sync_period=3, compat="holocron")

    # The rate Scout used at PARAMS0: slow = p0 + rate * (fast - p0), one sync, at step 3.
    params, fast, state, fstate = PARAMS0, PARAMS0, scout.init(PARAMS0), inner.init(PARAMS0)
    for _ in range(K):
        updates, state = scout.update(grad(inner_loss)(params, DATA), state, params)
        params = holotx.apply_updates(params, updates)
        updates, fstate = inner.update(grad(inner_loss)(fast, DATA), fstate, fast)
        fast = holotx.apply_updates(fast, updates)
    rates = (flat(state.slow) - flat(PARAMS0)) / (flat(fast) - flat(PARAMS0))
    rate = rates.mean().item()
    torch.testing.assert_close(rates, torch.full_like(rates, rate), rtol=1e-9, atol=0)
    assert 0.02 < rate < 0.2  # the coherence branch, not the floor

    frozen = holotx.lookahead(inner, sync_rate=rate, sync_period=3)
    auto = flat(grad(lambda p: unroll(scout, p))(PARAMS0))
    assert_close_to_fd(auto, fd_params(lambda p: unroll(frozen, p)),
                       "scout-holocron-k3 d/dparams0 (frozen rate)")
    fd_scout = fd_params(lambda p: unroll(scout, p))
    assert (auto - fd_scout).abs().max() > 1e-4 * fd_scout.abs().max()


# ------------------------------------------------------------ 3. plain autograd


AUTOGRAD_CASES = [c for c in OPTIMIZERS + WRAPPERS if c.name in {
    "sgd-nesterov", "adam", "adamw", "lamb", "lars-wd-holocron", "adan", "adamp-projected",
    "lookahead(adamw)", "scout(adamw)", "scout-k3-coherent(adamw)", "lookahead-holocron(sgd-momentum)"}]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in AUTOGRAD_CASES])
def test_plain_autograd_matches_torch_func(case: Case) -> None:
    """Params and lr as leaves with ``requires_grad``, inner gradients by
    ``torch.autograd.grad(create_graph=True)``, then ``torch.autograd.grad(outer, [p0, lr])``."""
    assert len(AUTOGRAD_CASES) == 11
    keys = sorted(PARAMS0)
    p0 = {k: PARAMS0[k].clone().requires_grad_() for k in keys}
    lr = torch.tensor(LR, dtype=F64, requires_grad=True)
    tx = case.build(lr)
    params, state = p0, tx.init(p0)
    for _ in range(case.steps):
        inner = torch.autograd.grad(inner_loss(params, DATA), [params[k] for k in keys], create_graph=True)
        updates, state = tx.update(dict(zip(keys, inner)), state, params)
        params = holotx.apply_updates(params, updates)
    *g_p, g_lr = torch.autograd.grad(outer_loss(params, DATA), [p0[k] for k in keys] + [lr])

    meta = lambda p, r: unroll(case.build(r), p, steps=case.steps)
    f_p, f_lr = grad(meta, argnums=(0, 1))(PARAMS0, torch.tensor(LR, dtype=F64))
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in g_p]), flat(f_p), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(g_lr, f_lr, rtol=1e-11, atol=1e-13)


# ---------------------------------------------- 4. stopping gradients through the state


DETACH_CASES = [c for c in OPTIMIZERS + WRAPPERS
                if c.name in {"sgd-momentum", "adam", "lamb", "adan", "lookahead(adamw)",
                              "scout(sgd-momentum)"}]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in DETACH_CASES])
def test_detach_state_is_state_held_constant(case: Case) -> None:
    """With ``state = holotx.tree.detach(state)`` after each step, the meta-gradient is
    the derivative of the loop in which every step after the first reads the optimizer
    state of the unperturbed run as a constant (replayed from a recording), checked by
    FD of that replay; and, the history mattering, it differs from the full meta-gradient."""
    assert len(DETACH_CASES) == 6
    tx = case.build()
    states, params = [], PARAMS0
    state = tx.init(params)
    for _ in range(K):
        updates, state = tx.update(grad(inner_loss)(params, DATA), state, params)
        params = holotx.apply_updates(params, updates)
        states.append(state)

    def replay(p: dict[str, torch.Tensor]) -> torch.Tensor:
        s = tx.init(p)  # the first step's state is built from p itself, as in the detached loop
        for t in range(K):
            updates, _ = tx.update(grad(inner_loss)(p, DATA), s, p)
            p = holotx.apply_updates(p, updates)
            s = states[t]
        return outer_loss(p, DATA)

    detached = flat(grad(lambda p: unroll(tx, p, between=holotx.tree.detach))(PARAMS0))
    assert_close_to_fd(detached, fd_params(replay), f"{case.name} d/dparams0 (state detached)")
    full = flat(grad(lambda p: unroll(tx, p))(PARAMS0))
    assert (detached - full).abs().max() > 1e-3 * full.abs().max()


def test_detach_state_differs_from_full_for_adam() -> None:
    tx = holotx.adam(lr=LR)
    full = flat(grad(lambda p: unroll(tx, p))(PARAMS0))
    detached = flat(grad(lambda p: unroll(tx, p, between=holotx.tree.detach))(PARAMS0))
    assert (detached - full).abs().max() > 1e-2 * full.abs().max()
    # The value of the loss is untouched: detaching only changes what is differentiated.
    assert unroll(tx, PARAMS0, between=holotx.tree.detach).item() == unroll(tx, PARAMS0).item()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in DETACH_CASES])
def test_detach_state_one_step_equals_full(case: Case) -> None:
    """K = 1: there is no history to cut (the state is detached after the only step)."""
    lr0 = torch.tensor(LR, dtype=F64)
    full = grad(lambda p, lr: unroll(case.build(lr), p, steps=1), argnums=(0, 1))(PARAMS0, lr0)
    detached = grad(lambda p, lr: unroll(case.build(lr), p, steps=1, between=holotx.tree.detach),
                    argnums=(0, 1))(PARAMS0, lr0)
    torch.testing.assert_close(flat(detached[0]), flat(full[0]), rtol=0, atol=0)
    torch.testing.assert_close(detached[1], full[1], rtol=0, atol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_detach_state_stateless_sgd_equals_full(weight_decay: float) -> None:
    """Plain SGD keeps no state: detaching it changes nothing, for any K."""
    lr0 = torch.tensor(LR, dtype=F64)
    for steps in (1, 3, 5):
        def meta(p: dict[str, torch.Tensor], lr: torch.Tensor, between: Any = None,
                 steps: int = steps) -> torch.Tensor:
            return unroll(holotx.sgd(lr=lr, weight_decay=weight_decay), p, steps=steps, between=between)

        full = grad(meta, argnums=(0, 1))(PARAMS0, lr0)
        detached = grad(lambda p, lr: meta(p, lr, holotx.tree.detach), argnums=(0, 1))(PARAMS0, lr0)
        torch.testing.assert_close(flat(detached[0]), flat(full[0]), rtol=0, atol=0)
        torch.testing.assert_close(detached[1], full[1], rtol=0, atol=0)


def test_detach_inner_state_keeps_injected_lr_differentiable() -> None:
    """``detach`` of a whole ``InjectHyperparamsState`` detaches the injected values
    too (they are state): the lr's meta-gradient then only comes from the first step. To
    stop gradients through the history but keep meta-learning the lr, detach
    ``inner_state`` alone; for stateless SGD that is the full meta-gradient."""
    tx = holotx.inject_hyperparams(holotx.sgd)(lr=LR)
    lr0 = torch.tensor(LR, dtype=F64)

    def meta(lr: torch.Tensor, between: Any = None, steps: int = K) -> torch.Tensor:
        return unroll(tx, PARAMS0, steps=steps, setup=lambda s: set_hyperparam(s, "lr", lr), between=between)

    full = grad(meta)(lr0)
    def detach_inner(state: Any) -> Any:
        return state._replace(inner_state=holotx.tree.detach(state.inner_state))

    inner_only = grad(lambda lr: meta(lr, detach_inner))(lr0)
    assert inner_only.item() == full.item()
    assert_close_to_fd(full, fd_scalar(meta, LR), "inject(sgd) d/dlr")
    whole = grad(lambda lr: meta(lr, holotx.tree.detach))(lr0)
    assert abs(whole.item() - full.item()) > 1e-3 * abs(full.item())
    # Only step 1 sees the differentiated lr (later steps read a detached copy).
    def first_step_only(lr: torch.Tensor) -> torch.Tensor:
        params = PARAMS0
        for t in range(K):
            step = holotx.sgd(lr=lr if t == 0 else lr.detach())
            updates, _ = step.update(grad(inner_loss)(params, DATA), step.init(params), params)
            params = holotx.apply_updates(params, updates)
        return outer_loss(params, DATA)

    torch.testing.assert_close(whole, grad(first_step_only)(lr0), rtol=1e-12, atol=0)


# ------------------------------------------------------------- 5. vmap over tasks


TASKS = 4


@pytest.mark.parametrize("name", ["adam", "lookahead(adam)"])
def test_vmap_over_tasks(name: str) -> None:
    """``vmap(grad(meta_loss))`` over a batch of task datasets equals the loop over tasks,
    for the gradient w.r.t. the (shared) initial params and w.r.t. the lr."""
    def build(lr: Any) -> holotx.GradientTransformation:
        opt = holotx.adam(lr=lr)
        return opt if name == "adam" else holotx.lookahead(opt, sync_rate=0.5, sync_period=2)

    def meta(p: dict[str, torch.Tensor], lr: torch.Tensor, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return unroll(build(lr), p, data)

    tasks = make_data(seed=5, batch=(TASKS,))
    lr0 = torch.tensor(LR, dtype=F64)
    g_p, g_lr = vmap(grad(meta, argnums=(0, 1)), in_dims=(None, None, 0))(PARAMS0, lr0, tasks)
    assert g_p["w"].shape == (TASKS, 3, 2)
    assert g_lr.shape == (TASKS,)
    for i in range(TASKS):
        task = tuple(x[i] for x in tasks)
        e_p, e_lr = grad(meta, argnums=(0, 1))(PARAMS0, lr0, task)
        for key in PARAMS0:
            torch.testing.assert_close(g_p[key][i], e_p[key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_lr[i], e_lr, rtol=1e-12, atol=1e-14)
    # The tasks differ, so the batch is not one gradient repeated.
    assert (g_p["w"][0] - g_p["w"][1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["adam", "adamw", "radam", "lamb", "ralars", "tadam", "adabelief", "adamp",
                                  "adan", "ademamix"])
@pytest.mark.parametrize("how", ["func", "autograd"])
def test_zero_gradient_entry_gives_a_finite_meta_gradient(name, how):
    """A gradient entry that is exactly zero (a dead ReLU unit) has a zero second moment,
    where the square root's derivative is infinite: 0 * inf would be NaN. The meta-gradient
    must be finite and equal finite differences."""
    tx = getattr(holotx, name)(lr=0.1)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)

    def final(w):
        p = {"w": w}
        state = tx.init(p)
        for _ in range(3):
            u, state = tx.update({"w": torch.tanh(p["w"]) * mask}, state, p)
            p = holotx.apply_updates(p, u)
        return p["w"].sum()

    w0 = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    if how == "func":
        got = torch.func.grad(final)(w0)
    else:
        w = w0.clone().requires_grad_()
        (got,) = torch.autograd.grad(final(w), [w])
    assert torch.isfinite(got).all(), got
    h = 1e-6
    basis = torch.eye(3, dtype=torch.float64)
    fd = torch.stack([(final(w0 + h * e) - final(w0 - h * e)) / (2 * h) for e in basis])
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)


def test_batch_dims_lets_vmap_batch_a_state_holding_none():
    """Adam's state holds None (no AMSGrad maximum): vmap refuses out_dims 0 for it, and
    batch_dims gives None there."""
    tx = holotx.adamw(lr=0.1)
    one = {"w": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="NoneType"):
        torch.func.vmap(tx.init)({"w": torch.zeros(4, 3, dtype=torch.float64)})
    dims = holotx.tree.batch_dims(tx.init(one))
    assert dims[0].nu_max is None
    assert dims[0].mu == {"w": 0}
    batched = torch.func.vmap(tx.init, out_dims=dims)({"w": torch.zeros(4, 3, dtype=torch.float64)})
    assert batched[0].mu["w"].shape == (4, 3)
    assert batched[0].count["w"].shape == (4,)


def test_differentiated_sqrt_keeps_values_nan_and_negative_included():
    """The derivative-0-at-0 square root changes no value: NaN and negative inputs still
    give NaN, as the plain one."""
    x = torch.tensor([4.0, 0.0, -1.0, float("nan"), 2.0], dtype=torch.float64)
    plain = holotx.ops.sqrt([x])[0]
    w = x.clone().requires_grad_()
    differentiated = holotx.ops.sqrt([w])[0]
    torch.testing.assert_close(differentiated, plain, equal_nan=True, rtol=0, atol=0)
    (g,) = torch.autograd.grad(differentiated[[0, 1, 4]].sum(), [w])
    assert g[1] == 0.0
    torch.testing.assert_close(g[[0, 4]], 0.5 / x[[0, 4]].sqrt(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tadam_under_vmap_in_single_and_half_precision(dtype: torch.dtype) -> None:
    """TAdam's first moment mixes in the gradient by a per-tensor weight, a float64
    per-step scalar; under vmap (and grad) it is a tensor, which lerp takes only in the
    values' dtype: it is taken so (in float32 for half types, rounded once, as torch's
    kernels take a Python float weight). float32 and bfloat16 used to raise "expected
    dtype float for `weight` but got dtype double". The batched update equals the loop
    to a few units in the last place (the per-tensor sums accumulate in another order)."""
    tx = holotx.tadam(1e-2)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 7, generator=gen).to(dtype)}
    state = tx.init(params)
    for _ in range(2):  # (past the first step, whose weight mixes from zero moments)
        _, state = tx.update({"w": torch.randn(5, 7, generator=gen).to(dtype)}, state, params)
    grads = torch.randn(4, 5, 7, generator=gen).to(dtype)
    batched = vmap(lambda g: tx.update({"w": g}, state, params)[0]["w"])(grads)
    for i in range(4):
        looped = tx.update({"w": grads[i]}, state, params)[0]["w"]
        ulp = torch.finfo(dtype).eps * looped.abs().max().item()
        torch.testing.assert_close(batched[i].double(), looped.double(), rtol=0, atol=4 * ulp)
