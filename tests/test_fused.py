"""``fused=True``: params, grads and state in flat buffers, one compiled step.

Every check compares the fused optimizer with the unfused one run on the same model and
data, after every step: params and every state entry, in float64, where the two differ
only by the compiler's rounding (a few ulps of the values' scale). The semantics tests
compile with dynamo's ``eager`` backend (the same graph, no inductor code generation) to
stay quick; the numerics tests compile with inductor, as users do.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import warnings

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import holotx
from holotx.adapters import LAMB, LARS, AdaBelief, TAdam, TransformOptimizer, _fused, create_optimizer

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

RULES = {
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "adam": dict(lr=1e-2, amsgrad=True),
    "sgd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adabelief": dict(lr=1e-2, weight_decay=0.01),
    "adan": dict(lr=1e-2, weight_decay=0.02),
    "ademamix": dict(lr=1e-2, weight_decay=0.01),
    "radam": dict(lr=1e-2),
    "lamb": dict(lr=1e-2, weight_decay=0.1),
    "lars": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    "ralars": dict(lr=1e-2, weight_decay=0.1),
    "tadam": dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
    # The official projection (per output channel, then per tensor) and Holocron's.
    "adamp": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, nesterov=True, delta=1.0),
    "adamp_holocron": dict(lr=1e-2, weight_decay=0.1, delta=1.0, compat="holocron"),
}
"""Each rule's hyperparameters, by test id: the registered name, or one with a ``_``
suffix (:func:`registered`)."""


def registered(name: str) -> str:
    """The registered name of a :data:`RULES` id."""
    return name.split("_")[0]


@pytest.fixture
def eager_backend(monkeypatch):
    """Compile the fused step with dynamo's eager backend, counting the graphs made."""
    graphs = []
    eager = lookup_backend("eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return eager(gm, example_inputs)

    monkeypatch.setattr(_fused, "BACKEND", counting)
    return graphs


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.LayerNorm(9),
                               torch.nn.Linear(9, 3)).double()


def backward(m: torch.nn.Module, step: int, skip: tuple[torch.Tensor, ...] = ()) -> None:
    """Gradients that are the same seeded noise for every run (a loss linear in the
    params): the runs compared differ by their rounding alone, not by what training
    makes of it. Params in ``skip`` are not reached."""
    gen = torch.Generator().manual_seed(100 + step)
    noise = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in m.parameters()]
    sum((p * g).sum() for p, g in zip(m.parameters(), noise) if all(p is not q for q in skip)).backward()


ROUNDING = 1e-13
"""The float64 bound, relative to the scale of the values compared: the compiled step
rounds a few ulps apart from the eager one (fused multiply-adds; per-tensor norms summed
by rows, then tensors), which five steps accumulate."""


def assert_same(m_fused, opt_fused, m_plain, opt_plain, what: str) -> None:
    """Params and every state entry equal up to rounding: float64, scale-tied bound."""
    for (name, a), b in zip(m_fused.named_parameters(), m_plain.parameters()):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=ROUNDING, atol=ROUNDING * scale,
                                   msg=lambda m: f"{what}, param {name}: {m}")
    sf, sp = opt_fused.state_dict()["state"], opt_plain.state_dict()["state"]
    assert sf.keys() == sp.keys(), what
    for i in sp:
        assert sf[i].keys() == sp[i].keys(), f"{what}, param {i}"
        for key in sp[i]:
            a, b = sf[i][key], sp[i][key]
            assert a.dtype == b.dtype, f"{what}, param {i}, {key}"
            assert a.shape == b.shape, f"{what}, param {i}, {key}"
            scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=ROUNDING, atol=ROUNDING * scale,
                                       msg=lambda m: f"{what}, param {i}, {key}: {m}")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(RULES))
def test_fused_equals_unfused(name):
    """Inductor-compiled over flat buffers, every elementwise and trust-ratio rule, TAdam
    and AdamP (both projections) give the unfused step's params and state, through a scheduler
    and a group added mid-run (the module's decay/no-decay groups: trust ratios masked on
    one of them)."""
    runs = []
    for fused in (True, False):
        m = model()
        opt = create_optimizer(m, registered(name), fused=fused, **RULES[name])
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
        runs.append((m, opt, sched))
    gen = torch.Generator().manual_seed(7)
    start = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    extra = [torch.nn.Parameter(start.clone()) for _ in runs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no group falls back
        for step in range(5):
            if step == 2:
                for (_, opt, _), p in zip(runs, extra):
                    opt.add_param_group({"params": [p], "lr": 3e-3})
            for (m, opt, sched), p in zip(runs, extra):
                opt.zero_grad()
                backward(m, step)
                if step >= 2:
                    noise = torch.randn(4, 3, dtype=p.dtype, generator=torch.Generator().manual_seed(step))
                    (p * noise).sum().backward()
                opt.step()
                sched.step()
            assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1], f"{name}, step {step}")
    torch.testing.assert_close(extra[0], extra[1], rtol=ROUNDING, atol=ROUNDING)


def test_float32_within_rounding():
    """float32, compiled vs eager: the same rule up to a few ulps of the values."""
    outs = []
    for fused in (True, False):
        torch.manual_seed(0)
        m = torch.nn.Linear(64, 32)
        opt = LAMB(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
        for step in range(4):
            opt.zero_grad()
            m(torch.randn(16, 64, generator=torch.Generator().manual_seed(step))).square().sum().backward()
            opt.step()
        outs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


def test_no_recompile_when_hyperparameters_change(eager_backend):
    """lr (a scheduler's), betas and weight decay enter the graph as 0-d tensors."""
    m = model()
    opt = TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.7)
    plain_m = model()
    plain = TransformOptimizer(plain_m.parameters(), holotx.adamw, lr=1e-2, weight_decay=0.1)
    plain_sched = torch.optim.lr_scheduler.ExponentialLR(plain, 0.7)
    for step in range(6):
        for mm, o, s in ((m, opt, sched), (plain_m, plain, plain_sched)):
            if step == 3:
                o.param_groups[0].update(betas=(0.8, 0.99), weight_decay=0.3)
            o.zero_grad()
            backward(mm, step)
            o.step()
            s.step()
        assert_same(m, opt, plain_m, plain, f"step {step}")
    assert len(eager_backend) == 1, f"{len(eager_backend)} graphs for one group"


def test_unchanged_numbers_reach_the_fused_step_as_the_same_tensors(eager_backend, monkeypatch):
    """A group's numbers enter the graph as tensors made once and given again while the
    value stays (each made a sixth of a small model's step); a changed number gets a new
    one, a tensor lr (changed in place by the user) is read at every step, and no two
    names share a tensor (aliased graph inputs would be guarded on). The steps equal the
    unfused optimizer's throughout."""
    from holotx.adapters import optimizer as adapter_module

    made = []

    def counting(value, device, shape=()):
        made.append(value)
        return as_tensor(value, device, shape)

    as_tensor = adapter_module._as_tensor
    monkeypatch.setattr(adapter_module, "_as_tensor", counting)
    m, plain_m = model(), model()
    opt = TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, weight_decay=1e-2, eps=1e-2, fused=True)
    plain = TransformOptimizer(plain_m.parameters(), holotx.adamw, lr=1e-2, weight_decay=1e-2, eps=1e-2)
    class Quiet(float):  # (a float whose repr does not show its value)
        def __repr__(self):
            return "Quiet"

    # None: the tensor, filled in place.
    lrs = [1e-2, 1e-2, Quiet(1e-2), Quiet(2e-2), 1e-2, torch.tensor([1e-2]), None]
    counts = []
    for step, lr in enumerate(lrs):
        for o in (opt, plain):
            if lr is None:
                o.param_groups[0]["lr"].fill_(3e-2)
            elif step == 0 or repr(lr) != repr(lrs[step - 1]) or lr != lrs[step - 1] or isinstance(
                    lr, torch.Tensor):
                o.param_groups[0]["lr"] = lr.clone() if isinstance(lr, torch.Tensor) else lr
        for mm, o in ((m, opt), (plain_m, plain)):
            o.zero_grad()
            backward(mm, step)
            o.step()
        assert_same(m, opt, plain_m, plain, f"step {step}")
        counts.append(len(made))
    # Step 0 makes lr, betas (the pair, and each of its two), eps and weight decay; steps 1-2
    # nothing; 3 and 4 a new lr each; 5 and 6 a tensor lr, converted at each step.
    assert [b - a for a, b in zip([0, *counts], counts)] == [6, 0, 0, 1, 1, 1, 1], counts
    tensors = [t for _, t in opt._number_tensors[id(opt.param_groups[0])][1].values()]
    assert len({id(t) for t in tensors}) == len(tensors) == 4  # lr = eps = weight decay, 3 tensors
    assert len(eager_backend) == 1


def test_params_grads_and_state_are_views_of_flat_buffers(eager_backend):
    m = model()
    opt = TransformOptimizer(m.parameters(), holotx.adam, lr=1e-2, fused=True)
    backward(m, 0)
    opt.step()
    params = list(m.parameters())
    (binding,) = [b for _, b in opt._fused_groups.values()]
    for p in params:
        assert p.untyped_storage().data_ptr() == binding.param_buffers[0].untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == binding.grad_buffers[0].untyped_storage().data_ptr()
        for key in ("mu", "nu"):
            assert opt.state[p][key].untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
            assert opt.state[p][key]._base is not None
    grads = [p.grad for p in params]
    opt.zero_grad()
    assert all(p.grad is g for p, g in zip(params, grads)), "zero_grad keeps the views"
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    backward(m, 1)  # accumulates into the views
    assert all(p.grad is g for p, g in zip(params, grads))
    assert all(torch.count_nonzero(g) > 0 for g in grads)


def test_grads_left_as_they_were(eager_backend):
    m = model()
    opt = TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, fused=True)
    backward(m, 0)
    before = [p.grad.clone() for p in m.parameters()]
    opt.step()
    opt.step()
    for p, g in zip(m.parameters(), before):
        assert torch.equal(p.grad, g)


def test_a_grad_of_the_users_own_is_used(eager_backend):
    """A ``.grad`` that is not the view (set by hand, DDP's bucket view) is copied in."""
    runs = []
    for fused in (True, False):
        m = model()
        opt = TransformOptimizer(m.parameters(), holotx.sgd, lr=0.1, momentum=0.9, fused=fused)
        for step in range(3):
            opt.zero_grad()
            backward(m, step)
            if step == 1:
                for p in m.parameters():
                    p.grad = torch.full_like(p, 0.25)
            opt.step()
        runs.append((m, opt))
    assert_same(*runs[0], *runs[1], "own grads")


def test_a_param_without_gradient_is_skipped_then_the_group_runs_unfused(eager_backend):
    """torch.optim skips a param that backward did not reach after zero_grad(): so does
    the fused group (its zeroed view is no gradient), running that step unfused; the
    step counts then differ within the group, which stays unfused and says so once."""
    runs = []
    for fused in (True, False):
        m = model()
        opt = TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, weight_decay=0.1, fused=fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(5):
                opt.zero_grad()
                # At step 2 the last layer is not reached: its params have no gradient.
                backward(m, step, skip=tuple(m[3].parameters()) if step == 2 else ())
                opt.step()
        runs.append((m, opt))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if fused:
            assert len(messages) == 1, messages
            assert "param 4 had no gradient" in messages[0], messages
            assert m[3].weight.grad is not None  # reached again at steps 3 and 4
    (m, opt) = runs[0]
    counts = {opt.state[p]["count"].item() for p in m.parameters()}
    assert counts == {4, 5}
    assert_same(*runs[0], *runs[1], "a skipped param")


def test_no_gradient_at_all_skips_the_group(eager_backend):
    m = model()
    opt = TransformOptimizer(m.parameters(), holotx.adam, lr=1e-2, fused=True)
    backward(m, 0)
    opt.step()
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    assert {opt.state[p]["count"].item() for p in m.parameters()} == {1}


@pytest.mark.parametrize("optimizer", [LAMB, TAdam], ids=["LAMB", "TAdam"])
def test_checkpoints_move_between_fused_and_unfused(eager_backend, tmp_path, optimizer):
    """Saved fused, loaded unfused (``torch.load(weights_only=True)``), and back: the run
    continues as an unfused run would (TAdam's per-param weight sums included, which
    fused are entries of one vector per buffer)."""
    ref_m = model()
    ref = optimizer(ref_m.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(6):
        ref.zero_grad()
        backward(ref_m, step)
        ref.step()

    m = model()
    opt = optimizer(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(2):
        opt.zero_grad()
        backward(m, step)
        opt.step()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, tmp_path / "fused.pt")
    saved = torch.load(tmp_path / "fused.pt", weights_only=True)
    m2 = model(1)
    m2.load_state_dict(saved["model"])
    opt2 = optimizer(m2.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(saved["opt"])
    for step in range(2, 4):
        opt2.zero_grad()
        backward(m2, step)
        opt2.step()
    buffer = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    m.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])  # into the fused optimizer: its buffers take the values
    for step in range(4, 6):
        opt.zero_grad()
        backward(m, step)
        opt.step()
    assert_same(m, opt, ref_m, ref, "after the round trip")
    assert opt.state[m[0].weight]["mu"]._base is not None, "the loaded state went into the flat buffers"
    if optimizer is TAdam:
        assert opt.state[m[0].weight]["weight_sum"]._base is not None


def test_copies_step_on_their_own(eager_backend):
    m = model()
    opt = TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, fused=True)
    backward(m, 0)
    opt.step()
    m_copy, opt_copy = copy.deepcopy((m, opt))
    unpickled = pickle.loads(pickle.dumps(opt))
    assert unpickled.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    for mm, o in ((m, opt), (m_copy, opt_copy)):
        o.zero_grad()
        backward(mm, 1)
        o.step()
    assert_same(m, opt, m_copy, opt_copy, "a deep copy")


def step_side_by_side(runs, steps: int, what: str) -> None:
    """Step the fused run and the unfused one (``[(model, optimizer), ...]``) on the same
    gradients, comparing them after every step."""
    for step in range(steps):
        for m, opt in runs:
            opt.zero_grad()
            backward(m, step)
            opt.step()
        assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1], f"{what}, step {step}")


WRAPPED = {
    "lookahead": lambda: holotx.lookahead(holotx.adamw(1e-2, weight_decay=0.1), 0.5, 3),
    "scout": lambda: holotx.scout(holotx.adamw(1e-2, weight_decay=0.1), 0.3, 3),
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_wrapper_transforms_fused_equal_unfused(name):
    """Lookahead and Scout as transforms through the adapter: fused (Scout's coherence
    per tensor over the buffers' segments) equals unfused after every step, across three
    synchronisations, with two graphs for all of them: one for the steps that synchronise
    and one for those that do not (the sync flags are decided on the host before the step,
    see test_a_fused_step_that_does_not_synchronise_reads_no_slow_weights)."""
    from torch._dynamo.utils import counters

    runs = []
    for fused in (True, False):
        m = model()
        runs.append((m, TransformOptimizer(m.parameters(), lambda: WRAPPED[name](), fused=fused)))
    graphs_before = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        step_side_by_side(runs, 9, name)
    assert counters["stats"]["unique_graphs"] - graphs_before == 2


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_a_fused_step_that_does_not_synchronise_reads_no_slow_weights(eager_backend, name):
    """The sync flags come from the host counts before the compiled step, so a step that
    does not synchronise has a graph of its own that does not take the slow weights at all
    (dynamo lifts only the tensors a graph reads, each named after its source), where one
    graph selecting with torch.where read and wrote them at every step. The graph of the
    step that synchronises takes them."""
    runs = []
    for fused in (True, False):
        m = model()
        runs.append((m, TransformOptimizer(m.parameters(), lambda: WRAPPED[name](), fused=fused)))
    step_side_by_side(runs, 6, name)
    assert len(eager_backend) == 2, f"{len(eager_backend)} graphs"

    def inputs(gm):
        return [n.name for n in gm.graph.nodes if n.op == "placeholder"]

    quiet, syncing = eager_backend  # the first step does not synchronise (period 3)
    assert not [x for x in inputs(quiet) if "slow" in x], inputs(quiet)
    assert [x for x in inputs(syncing) if "slow" in x], inputs(syncing)
    assert not [n for n in quiet.graph.nodes if getattr(n.target, "__name__", "") == "where"]


@pytest.mark.parametrize("wrapper", ["Lookahead", "Scout"])
def test_wrapper_classes_around_a_fused_optimizer(eager_backend, wrapper):
    """The optimizer-level wrappers step a fused base optimizer as they step an unfused
    one: same params and state after every step, same checkpoint keys, one graph."""
    from holotx import adapters

    runs = []
    for fused in (True, False):
        m = model()
        base = TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, weight_decay=0.1, fused=fused)
        runs.append((m, getattr(adapters, wrapper)(base, sync_rate=0.5, sync_period=3)))
    step_side_by_side(runs, 7, wrapper)
    assert len(eager_backend) == 1
    assert runs[0][1].base_optimizer._fused_groups, "the base optimizer is fused"


# -- fallbacks: a warning once, and the unfused step ------------------------------------

def _fallback_matches(make, match: str, steps: int = 3, dtype=torch.float64) -> None:
    runs = []
    for fused in (True, False):
        m = model().to(dtype)
        opt = make(m.parameters(), fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(steps):
                opt.zero_grad()
                backward(m, step)
                opt.step()
        warned = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        messages = [str(w.message) for w in warned]
        if fused:
            assert len(messages) == 1, messages
            assert "runs unfused" in messages[0], messages[0]
            assert match in messages[0], messages[0]
            assert warned[0].filename == __file__, f"the warning points at {warned[0].filename}, not the step"
        else:
            assert not messages
        runs.append((m, opt))
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)


def test_rules_without_a_flat_path_run_unfused(eager_backend):
    _fallback_matches(lambda ps, f: TransformOptimizer(
        ps, lambda: holotx.scout(holotx.adamw(1e-2), compat="holocron"), fused=f), "no flat path")
    # A mask per param cannot be followed into a flat buffer either.
    _fallback_matches(lambda ps, f: TransformOptimizer(
        ps, holotx.lamb, lr=1e-2, trust_ratio_mask=lambda params: [p.ndim > 1 for p in params], fused=f),
        "no flat path")


def test_state_dtype_upcasts_run_unfused(eager_backend):
    _fallback_matches(lambda ps, f: TransformOptimizer(ps, holotx.adamw, lr=1e-2, state_dtype=torch.float32,
                                                       fused=f), "state_dtype", dtype=torch.bfloat16)


def test_a_failing_compiler_leaves_the_group_unfused(monkeypatch):
    def failing(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(_fused, "BACKEND", failing)
    _fallback_matches(lambda ps, f: AdaBelief(ps, lr=1e-2, fused=f), "torch.compile failed")


def test_params_bound_by_another_fused_optimizer(eager_backend):
    m = model()
    first = LARS(m.parameters(), lr=0.1, momentum=0.9, fused=True)
    second = TransformOptimizer(m.parameters(), holotx.sgd, lr=0.1, fused=True)
    backward(m, 0)
    first.step()
    with pytest.warns(RuntimeWarning, match="bound to the flat buffers of another fused optimizer"):
        second.step()
    assert quiet(second.step) is None  # warned once


def test_fused_must_be_a_bool():
    with pytest.raises(ValueError, match="fused must be a bool"):
        TransformOptimizer(model().parameters(), holotx.adam, fused="yes")


def test_params_that_do_not_require_grad(eager_backend):
    """Grads set by hand on params that do not require grad (torch's fused tests do so):
    the group fuses (no hook can be put on such a param; it holds its view only while it
    has a gradient) and steps as the unfused one, zero_grad() and a skipped step included."""
    runs = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen,
                                                                                      dtype=torch.float64)]
        opt = TransformOptimizer(params, holotx.adamw, lr=1e-2, fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for step in range(5):
                if step != 2:
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                opt.step()
                opt.zero_grad()
                assert all(p.grad is None for p in params)
        if fused:
            assert isinstance(opt._fused_groups[id(opt.param_groups[0]["params"])][1], _fused.FusedGroup)
        runs.append((params, opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=ROUNDING, atol=ROUNDING)
    assert {runs[0][1].state[p]["count"].item() for p in runs[0][0]} == {4}


# -- frozen params: left out of the flat buffers ----------------------------------------

TOLERANCE = {torch.float64: (ROUNDING, ROUNDING), torch.float32: (1e-5, 1e-6)}
"""rtol, and atol relative to the values' scale: float64's rounding bound, and the float32
one of :func:`test_float32_within_rounding`."""


@pytest.fixture
def fused_steps(monkeypatch):
    """Counts the steps run over flat buffers (every fused group's, together)."""
    calls = []
    step = _fused.FusedGroup.step

    def counting(self, *args, **kwargs):
        calls.append(self)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(_fused.FusedGroup, "step", counting)
    return calls


def frozen_runs(make, steps: int, events=(), dtype=torch.float64, frozen=(0,)):
    """The fused and the unfused optimizer (``make(model, fused)``) on the same model, the
    layers ``frozen`` frozen, stepped side by side and compared after every step;
    ``events[step](model)`` runs in both before that step's backward. Returns
    ``[(model, optimizer, [RuntimeWarning messages]), ...]``, the fused run first."""
    runs = []
    for fused in (True, False):
        m = model().to(dtype)
        for layer in frozen:
            m[layer].requires_grad_(False)
        runs.append((m, make(m, fused), []))
    rtol, atol = TOLERANCE[dtype]
    for step in range(steps):
        for m, opt, messages in runs:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.zero_grad()
                if step in dict(events):
                    dict(events)[step](m)
                backward(m, step)
                opt.step()
            messages += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        (mf, of, _), (mp, op, _) = runs
        for (name, a), b in zip(mf.named_parameters(), mp.parameters()):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()),
                                       msg=lambda msg: f"step {step}, param {name}: {msg}")
        sf, sp = of.state_dict()["state"], op.state_dict()["state"]
        assert sf.keys() == sp.keys(), f"step {step}"
        for i in sp:
            assert sf[i].keys() == sp[i].keys(), f"step {step}, param {i}"
            for key in sp[i]:
                x, y = sf[i][key], sp[i][key]
                assert (x.dtype, x.shape) == (y.dtype, y.shape), f"step {step}, param {i}, {key}"
                scale = max(1.0, y.abs().max().item()) if y.numel() else 1.0
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale,
                                           msg=lambda msg: f"step {step}, param {i}, {key}: {msg}")
    return runs


def binding_of(opt, g: int = 0):
    return opt._fused_groups[id(opt.param_groups[g]["params"])][1]


def packed(binding, p) -> bool:
    """Whether ``p`` is a view of one of the binding's param buffers."""
    ptr = p.untyped_storage().data_ptr()
    return any(ptr == b.untyped_storage().data_ptr() for b in binding.param_buffers)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_frozen_layer_is_left_out_and_the_rest_fuses(eager_backend, fused_steps, dtype):
    """A fine-tuned model's frozen layer (its params do not require grad and have no
    gradient when the group is bound) is left out of the flat buffers: the rest of the
    group steps fused at every step, with no warning and one graph, and equals the unfused
    run after every step; the frozen params do not move and keep, bit for bit, the state
    entries the unfused run gives them (initial values, count 0)."""
    make = lambda m, fused: TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, weight_decay=0.1,
                                               fused=fused)
    before = [p.detach().clone() for p in model().to(dtype)[0].parameters()]
    runs = frozen_runs(make, 5, dtype=dtype)
    (m, opt, messages), (m_plain, opt_plain, _) = runs
    assert messages == []
    assert len(fused_steps) == 5
    assert len(eager_backend) == 1
    binding = binding_of(opt)
    assert isinstance(binding, _fused.FusedGroup)
    assert binding.members == [False, False, True, True, True, True]
    assert [packed(binding, p) for p in m.parameters()] == binding.members
    for mm in (m, m_plain):
        assert all(torch.equal(p, b) for p, b in zip(mm[0].parameters(), before))
        assert all(p.grad is None for p in mm[0].parameters())
    sf, sp = opt.state_dict()["state"], opt_plain.state_dict()["state"]
    for i in (0, 1):
        assert all(torch.equal(sf[i][key], sp[i][key]) for key in sp[i])
        assert sf[i]["count"].item() == 0
        assert not sf[i]["mu"].any()
    assert {sf[i]["count"].item() for i in range(2, 6)} == {5}


@pytest.mark.parametrize("how", ["sgd, requires_grad_", "sgd, grad by hand", "adamw, requires_grad_"])
def test_a_frozen_layer_unfrozen_mid_run(eager_backend, fused_steps, how):
    """A left-out param that gets a gradient (unfrozen, or its ``.grad`` set by hand) is
    stepped as unfused: where its state can share the buffers (SGD's momentum) the group
    is bound again with it and goes on fused, saying nothing, its step compiled anew;
    where its step count is not the others' (AdamW's: it did not step with them) the group
    runs unfused from then on, saying so once. Equal to the unfused run at every step."""
    rule, event = how.split(", ")
    if rule == "sgd":
        make = lambda m, fused: TransformOptimizer(m.parameters(), holotx.sgd, lr=0.1, momentum=0.9,
                                                   weight_decay=0.01, fused=fused)
    else:
        make = lambda m, fused: TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, weight_decay=0.1,
                                                   fused=fused)

    def by_hand(m):
        m[0].weight.grad = torch.randn(m[0].weight.shape, dtype=m[0].weight.dtype,
                                       generator=torch.Generator().manual_seed(5))

    events = ({3: lambda m: m[0].requires_grad_(True)} if event == "requires_grad_"
              else {3: by_hand, 4: by_hand, 5: by_hand})
    runs = frozen_runs(make, 6, events.items())
    (m, opt, messages), _ = runs
    if rule == "sgd":
        assert messages == []
        assert len(fused_steps) == 6
        assert len(eager_backend) == 2, "bound again, compiled again"
        binding = binding_of(opt)
        assert binding.members == [True, event == "requires_grad_", True, True, True, True]
        assert [packed(binding, p) for p in m.parameters()] == binding.members
    else:
        assert len(messages) == 1, messages
        assert "runs unfused: param 0, left out of its flat buffers while frozen, has a gradient" \
            in messages[0]
        assert "'count' is 0, where the params it would share a flat buffer with have 3" in messages[0]
        assert len(fused_steps) == 3
        assert isinstance(binding_of(opt), str)


def test_a_layer_frozen_mid_run_leaves_the_buffers(eager_backend, fused_steps):
    """A param frozen after the group was bound (it no longer requires grad, and has no
    gradient) leaves the buffers: the group is bound again without it and goes on fused,
    the param and its state in storage of their own (the old buffers are freed). Unfrozen
    again, it has skipped its group's steps: the group runs unfused, saying so once."""
    make = lambda m, fused: TransformOptimizer(m.parameters(), holotx.adamw, lr=1e-2, weight_decay=0.1,
                                               fused=fused)
    events = {2: lambda m: m[3].requires_grad_(False), 4: lambda m: m[3].requires_grad_(True)}
    runs = frozen_runs(make, 4, events.items(), frozen=())
    (m, opt, messages), _ = runs
    assert messages == []
    assert len(fused_steps) == 4
    assert len(eager_backend) == 2
    binding = binding_of(opt)
    assert binding.members == [True, True, True, True, False, False]
    for p in m[3].parameters():
        assert not packed(binding, p)
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), "its own storage"
        assert all(v._base is None for v in opt.state[p].values())
        assert opt.state[p]["count"].item() == 2
    runs = frozen_runs(make, 6, events.items(), frozen=())
    (m, opt, messages), _ = runs
    assert len(messages) == 1, messages
    assert "param 4 was frozen after its group was bound and has a gradient again" in messages[0]


def test_a_whole_frozen_group(eager_backend, fused_steps):
    """A group all of whose params are frozen is not bound and gets no state (as unfused:
    it is not stepped), while the others fuse; unfrozen mid-run, it binds on its first
    step and fuses too (AdamW: a layer to be unfrozen fuses in a group of its own)."""
    def make(m, fused):
        return TransformOptimizer([{"params": m[0].parameters(), "lr": 3e-3}, {"params": m[2:].parameters()}],
                                  holotx.adamw, lr=1e-2, weight_decay=0.1, fused=fused)

    runs = frozen_runs(make, 3)
    (m, opt, messages), (_, plain, _) = runs
    assert messages == []
    assert len(fused_steps) == 3
    assert len(eager_backend) == 1
    assert id(opt.param_groups[0]["params"]) not in opt._fused_groups
    assert not any(p in opt.state or p in plain.state for p in m[0].parameters())
    assert isinstance(binding_of(opt, 1), _fused.FusedGroup)

    runs = frozen_runs(make, 5, {3: lambda m: m[0].requires_grad_(True)}.items())
    (m, opt, messages), _ = runs
    assert messages == []
    assert len(fused_steps) == 3 + 3 + 2 * 2  # the first run's, then group 1's and, from step 3, group 0's
    assert len(eager_backend) == 1 + 2
    assert all(isinstance(binding_of(opt, g), _fused.FusedGroup) for g in (0, 1))
    assert {opt.state[p]["count"].item() for p in m[0].parameters()} == {2}


def test_checkpoints_with_a_frozen_layer_move_between_fused_and_unfused(eager_backend, tmp_path):
    """Saved fused with a frozen layer, loaded unfused (``weights_only=True``), and back
    into the fused optimizer: the run goes on as the unfused one, the loaded entries of the
    frozen params their own tensors, the others' views of the flat buffers."""
    make = lambda ps, fused: TransformOptimizer(ps, holotx.adamw, lr=1e-2, weight_decay=0.1, fused=fused)

    def run(m, opt, steps):
        for step in steps:
            opt.zero_grad()
            backward(m, step)
            opt.step()

    ref_m = model()
    ref_m[0].requires_grad_(False)
    ref = make(ref_m.parameters(), False)
    run(ref_m, ref, range(6))
    m = model()
    m[0].requires_grad_(False)
    opt = make(m.parameters(), True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run(m, opt, range(2))
        torch.save(opt.state_dict(), tmp_path / "fused.pt")
        m2 = copy.deepcopy(m)
        plain = make(m2.parameters(), False)
        plain.load_state_dict(torch.load(tmp_path / "fused.pt", weights_only=True))
        run(m2, plain, range(2, 4))
        torch.save(plain.state_dict(), tmp_path / "plain.pt")
        with torch.no_grad():
            for p, q in zip(m.parameters(), m2.parameters()):
                p.copy_(q)
        opt.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
        run(m, opt, range(4, 6))
    assert_same(m, opt, ref_m, ref, "after the round trip")
    sf, sr = opt.state_dict()["state"], ref.state_dict()["state"]
    assert all(torch.equal(sf[i][key], sr[i][key]) for i in (0, 1) for key in sr[i])
    assert all(v._base is None for v in opt.state[m[0].weight].values())
    assert opt.state[m[2].weight]["mu"]._base is not None, "the loaded state went into the flat buffers"


def test_meta_params_run_unfused_and_say_so(eager_backend):
    """Meta tensors have no data to pack: the group runs unfused (computing nothing), and
    the warning says why, instead of a failed compile."""
    with torch.device("meta"):
        m = torch.nn.Linear(3, 2)
        opt = TransformOptimizer(m.parameters(), holotx.adamw, fused=True)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    with pytest.warns(RuntimeWarning, match="param 0 is a meta tensor"):
        opt.step()
    assert not eager_backend


@pytest.mark.parametrize("factory", ["adamp", "adamw", "lamb"])
def test_the_fused_step_is_traced_once(monkeypatch, caplog, factory):
    """Hyperparameters reach the compiled step as tensors of one element (the factory gets
    0-d views of them). As 0-d inputs, dynamo traced them as symbolic Python floats, and
    one the step never computes with (AdamP's ``wd_ratio`` without weight decay) made it
    trace the whole step again ("Restarting analysis"): 1.5 to 2 s of a first step of 5 to 8."""
    graphs = []
    aot_eager = lookup_backend("aot_eager")  # (dynamo's eager backend runs no tensorify pass)

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(_fused, "BACKEND", counting)
    m = model()
    opt = TransformOptimizer(m.parameters(), getattr(holotx, factory), lr=1e-2, fused=True)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="torch._dynamo.convert_frame"):
        for step in range(2):
            opt.zero_grad()
            backward(m, step)
            opt.step()
    assert len(graphs) == 1
    restarts = [r.getMessage() for r in caplog.records if "Restarting analysis" in r.getMessage()]
    assert not restarts, restarts
