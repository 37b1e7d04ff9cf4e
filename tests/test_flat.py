"""Flat buffers and the step helper: the fast path computes what the pytree path computes."""

import io
import math

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._inductor.compile_fx import compile_fx

import holotx
from holotx import executor
from holotx.flat import FlatLayout, channel_sums, make_step, per_channel, segment_sums


def _params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return {
        "conv": torch.randn(4, 3, 2, 2, generator=gen, dtype=dtype),
        "bias": torch.randn(4, generator=gen, dtype=dtype),
        "nested": [torch.randn(1, generator=gen, dtype=dtype), torch.randn(5, 2, generator=gen, dtype=dtype)],
        "half": torch.randn(7, generator=gen).to(torch.bfloat16),
        "frozen": None,
    }


def test_layout_groups_by_dtype_and_round_trips():
    params = _params()
    layout = FlatLayout(params)
    assert layout.groups == [(torch.device("cpu"), torch.float64), (torch.device("cpu"), torch.bfloat16)]
    assert layout.sizes == [48 + 4 + 1 + 10, 7]
    buffers = layout.flatten(params)
    back = layout.unflatten(buffers)
    assert back["frozen"] is None
    for key in ("conv", "bias", "half"):
        assert torch.equal(back[key], params[key])
    assert torch.equal(back["nested"][1], params["nested"][1])
    back["bias"].fill_(3.0)  # views write through; optree orders dict keys, so bias is first
    assert torch.all(buffers[0][:4] == 3.0)


def test_layout_rejects_wrong_buffers():
    layout = FlatLayout(_params())
    with pytest.raises(ValueError, match="expected 2 flat buffers"):
        layout.unflatten([torch.zeros(63, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"flat buffer 0 has shape \(62,\), expected \(63,\)"):
        layout.unflatten([torch.zeros(62, dtype=torch.float64), torch.zeros(7, dtype=torch.bfloat16)])


def test_bind_makes_params_and_grads_views_of_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    layout = FlatLayout(params)
    flat_params = layout.bind(params)
    flat_grads = layout.bind_grads(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    model(torch.randn(5, 3)).sum().backward()
    assert flat_grads[0].abs().sum() > 0  # autograd accumulated into the views
    with torch.no_grad():
        flat_params[0].zero_()
    assert all(p.abs().sum() == 0 for p in params)


@pytest.mark.parametrize("factory", [lambda: holotx.adamw(1e-2), lambda: holotx.sgd(1e-2, momentum=0.9),
                                     lambda: holotx.radam(1e-2, weight_decay=0.1)],
                         ids=["adamw", "sgd", "radam"])
def test_flat_step_equals_tree_step(factory):
    """An elementwise optimizer over flat buffers is the same optimizer: float64, 10 steps,
    equal to rounding (the ops run in a different grouping, so not bit for bit)."""
    params = {k: v for k, v in _params().items() if k not in ("half", "frozen")}
    tx = factory()
    layout = FlatLayout(params)
    gen = torch.Generator().manual_seed(1)
    tree_step, flat_step = make_step(tx), make_step(tx, donate=True)
    tree_params, tree_state = params, tx.init(params)
    flat_params = layout.flatten(params)
    flat_state = tx.init(flat_params)
    for _ in range(10):
        grads = holotx.tree.map(lambda p: torch.randn(p.shape, generator=gen, dtype=p.dtype), params)
        tree_params, tree_state = tree_step(tree_params, grads, tree_state)
        flat_step(flat_params, layout.flatten(grads), flat_state)
        got = layout.unflatten(flat_params)
        for a, b in zip(holotx.tree.flatten(got)[0], holotx.tree.flatten(tree_params)[0]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_compiled_flat_step_matches_eager():
    """The fast path (donated step compiled over one flat buffer) computes the eager
    numbers: float32, 5 steps, to a few ulps (inductor may reassociate)."""
    params = [torch.randn(1000), torch.randn(10, 10)]
    tx = holotx.adamw(1e-2)
    layout = FlatLayout(params)
    eager_p, compiled_p = layout.flatten(params), layout.flatten(params)
    eager_s, compiled_s = tx.init(eager_p), tx.init(compiled_p)
    eager_step = make_step(tx, donate=True)
    torch._dynamo.reset()
    compiled_step = torch.compile(make_step(tx, donate=True), fullgraph=True)
    for i in range(5):
        g = torch.randn(layout.sizes[0], generator=torch.Generator().manual_seed(i))
        eager_step(eager_p, [g.clone()], eager_s)
        compiled_step(compiled_p, [g.clone()], compiled_s)
        torch.testing.assert_close(compiled_p[0], eager_p[0], rtol=1e-6, atol=1e-7)
    assert int(compiled_s[0].count[0]) == 5


def test_donated_step_changes_params_in_place_and_pure_does_not():
    params = [torch.ones(3)]
    tx = holotx.sgd(0.5)
    state = tx.init(params)
    new, _ = make_step(tx)(params, [torch.ones(3)], state)
    assert torch.equal(params[0], torch.ones(3))
    assert torch.equal(new[0], torch.full((3,), 0.5))
    same, _ = make_step(tx, donate=True)(params, [torch.ones(3)], state)
    assert same is params
    assert torch.equal(params[0], torch.full((3,), 0.5))


def test_donated_step_refuses_a_tensor_given_twice():
    """Tied weights given twice would be stepped twice in place."""
    shared = torch.ones(3)
    tx = holotx.sgd(0.1)
    step = make_step(tx, donate=True)
    with pytest.raises(ValueError, match=r"params at \['a'\] and \['b'\] are the same tensor"):
        step({"a": shared, "b": shared}, {"a": torch.ones(3), "b": torch.ones(3)},
             tx.init({"a": shared, "b": shared}))
    assert torch.equal(shared, torch.ones(3))


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_donated_step_refuses_a_tensor_given_twice():
    """Compiled, the same check (tensors compared by identity within dtype/shape groups,
    no id(): that would guard on every tensor and recompile at every step); under
    ``fullgraph=True`` dynamo wraps the ValueError, its message kept."""
    shared = torch.ones(3)
    tx = holotx.sgd(0.1)
    params = {"a": shared, "w": torch.ones(2, 2), "b": shared}
    grads = {"a": torch.ones(3), "w": torch.ones(2, 2), "b": torch.ones(3)}
    step = torch.compile(make_step(tx, donate=True), backend="eager")
    with pytest.raises(ValueError, match=r"params at \['a'\] and \['b'\] are the same tensor"):
        step(params, grads, tx.init(params))
    torch._dynamo.reset()
    strict = torch.compile(make_step(tx, donate=True), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"params at \['a'\] and \['b'\] are the same tensor"):
        strict(params, grads, tx.init(params))
    assert torch.equal(shared, torch.ones(3))


def test_aligned_layout_pads_with_zeros_and_round_trips():
    params = _params()
    layout = FlatLayout(params, align=8)
    # float64 leaves in tree order: bias (4), conv (48), nested[0] (1), nested[1] (10): each padded to 8.
    assert layout.sizes == [8 + 48 + 8 + 16, 8]
    buffers = layout.flatten(params)
    back = layout.unflatten(buffers)
    for key in ("conv", "bias", "half"):
        assert torch.equal(back[key], params[key])
    assert torch.equal(back["nested"][1], params["nested"][1])
    assert torch.count_nonzero(buffers[0][4:8]) == 0
    assert torch.count_nonzero(buffers[0][57:64]) == 0
    segments = layout.segments()
    assert [s.count for s in segments] == [4, 1]
    assert segments[0].width == 8
    assert segments[0].row_ids.tolist() == [0, 1, 1, 1, 1, 1, 1, 2, 3, 3]


def test_layout_alignment_errors():
    with pytest.raises(ValueError, match="align must be a positive integer"):
        FlatLayout(_params(), align=0)
    with pytest.raises(ValueError, match=r"segments\(\) needs a layout built with align > 1"):
        FlatLayout(_params()).segments()


SEGMENTED = {
    "lamb": lambda: holotx.lamb(1e-2, weight_decay=0.1, scale_clip=(0.5, 3.0)),
    "lamb_holocron": lambda: holotx.lamb(1e-2, weight_decay=0.1, compat="holocron"),
    "lars": lambda: holotx.lars(0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "ralars": lambda: holotx.ralars(1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "tadam": lambda: holotx.tadam(1e-2, weight_decay=0.1),
    "tadam_amsgrad_dof": lambda: holotx.tadam(1e-2, amsgrad=True, dof=2.5),
    "adamp": lambda: holotx.adamp(1e-2, weight_decay=0.1, delta=1.0),
    "adamp_decoupled_nesterov": lambda: holotx.adamp(1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                                                     nesterov=True, amsgrad=True, delta=2.0),
    "adamp_holocron": lambda: holotx.adamp(1e-2, weight_decay=0.1, delta=1.0, compat="holocron"),
    "adamp_holocron_nesterov": lambda: holotx.adamp(1e-2, nesterov=True, amsgrad=True, delta=10.0,
                                                    compat="holocron"),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(SEGMENTED))
def test_per_tensor_rule_over_segments_equals_the_tree(name, donate):
    """An aligned flat buffer with ``segments=`` computes each tensor's own reduction
    (trust ratios; TAdam's Student-t weight, with one weight sum per tensor in its state):
    the same steps as the pytree, to rounding (the sums are taken in another order)."""
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64),
              "b": torch.randn(7, generator=gen, dtype=torch.float64),
              "zero": torch.zeros(4, dtype=torch.float64),
              "conv": torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)}
    layout = FlatLayout(params, align=4)
    tx = SEGMENTED[name]()
    flat_step = make_step(tx, donate=donate)
    tree_state, flat_params = tx.init(params), layout.flatten(params)
    flat_state = tx.init(flat_params)
    for _ in range(8):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        updates, tree_state = tx.update(grads, tree_state, params)
        params = holotx.apply_updates(params, updates)
        flat_params, flat_state = flat_step(flat_params, layout.flatten(grads), flat_state,
                                            segments=layout.segments())
        back = layout.unflatten(flat_params)
        for key, value in params.items():
            torch.testing.assert_close(back[key], value, rtol=1e-12, atol=1e-14)
    # Leaves in key order: b (7 values, then 1 of gap), conv (54 + 2), w (15 + 1), zero (4).
    gaps = flat_params[0][[7, 62, 63, 79]]
    assert torch.count_nonzero(gaps) == 0, "the gaps between tensors must stay zero"


def test_tadam_state_must_match_its_segments():
    """TAdam sizes its weight sums at ``init`` from the buffers' segments: a state made
    without them, or used without them, is refused by name before anything is written."""
    params = {"w": torch.randn(5, 3), "b": torch.randn(7)}
    layout = FlatLayout(params, align=4)
    flat = layout.flatten(params)
    tx = holotx.tadam(1e-2)
    state = tx.init(flat)
    (tadam_state,) = [s for s in state if isinstance(s, holotx.transforms.ScaleByTAdamState)]
    assert [w.shape for w in tadam_state.weight_sum] == [torch.Size([2])], "one weight sum per tensor"
    unaligned = tx.init([b.clone() for b in flat])  # a clone carries no segments
    before = [x.clone() for x in holotx.tree.flatten(unaligned)[0] if x is not None]
    grads = [torch.ones_like(b) for b in flat]
    with pytest.raises(ValueError, match=r"weight_sum\[0\] has shape \(\) where its flat buffer packs 2"):
        make_step(tx, donate=True)(flat, grads, unaligned, segments=layout.segments())
    after = [x for x in holotx.tree.flatten(unaligned)[0] if x is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the donated state was written"
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads), "the donated grads were written"
    with pytest.raises(ValueError, match=r"pass segments=layout\.segments"):
        tx.update(flat, state, flat)


def test_segments_must_describe_their_buffers():
    """Segments from another layout are refused by name, before anything is written."""
    params = {"w": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(7, dtype=torch.float64)}
    layout = FlatLayout(params, align=4)
    other = FlatLayout({"w": torch.randn(9, 3, dtype=torch.float64)}, align=4)
    for tx in (holotx.tadam(1e-2), holotx.lamb(1e-2)):
        flat = layout.flatten(params)
        state = tx.init(flat)
        before = [x.clone() for x in flat]
        grads = [torch.ones_like(b) for b in flat]
        with pytest.raises(ValueError, match=r"describes 28 values in 1 tensors, but flat buffer 0 has 24"):
            make_step(tx, donate=True)(flat, grads, state, segments=other.segments())
        assert all(torch.equal(a, b) for a, b in zip(before, flat))


def test_aligned_buffers_load_with_weights_only_and_keep_their_segments():
    """An aligned layout's buffers are plain tensors to ``torch.save``: they load with
    ``weights_only=True`` (torch's default); the layout still knows their segments."""
    params = {"w": torch.randn(5, 3), "b": torch.randn(7)}
    layout = FlatLayout(params, align=4)
    flat = layout.flatten(params)
    assert holotx.tree.segments_of(flat[0]).count == 2
    buffer = io.BytesIO()
    torch.save(flat, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded[0], flat[0])
    assert holotx.tree.segments_of(loaded[0]) is None  # a loaded copy is not the layout's buffer


def test_tadam_over_segments_with_empty_tensors_and_half_precision():
    """Empty tensors (a buffer of only them, too) and bfloat16 buffers: the flat step is the
    tree step, params and first moment (the Student-t mix kept in float32 for bfloat16, as
    the tree path keeps it).

    The two sum in other orders (rows, then tensors; a foreach norm), so a bfloat16 value
    may round the other way now and then: at most one ulp, on a few values. The mix rounded
    to bfloat16 instead moved about 45% of the moment's values."""
    gen = torch.Generator().manual_seed(3)
    params = {"e": torch.zeros(0, dtype=torch.float64), "half": torch.randn(64, 16, generator=gen).bfloat16(),
              "e2": torch.zeros(0, dtype=torch.bfloat16), "h": torch.randn(300, generator=gen).bfloat16()}
    layout = FlatLayout(params, align=4)
    tx = holotx.tadam(1e-2)
    tree_params, tree_state = params, tx.init(params)
    flat_params = layout.flatten(params)
    flat_state = tx.init(flat_params)
    for _ in range(10):
        grads = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in params.items()}
        updates, tree_state = tx.update(grads, tree_state, tree_params)
        tree_params = holotx.apply_updates(tree_params, updates)
        flat_params, flat_state = make_step(tx, donate=True)(flat_params, layout.flatten(grads), flat_state,
                                                             segments=layout.segments())
    (tree_moments,) = [s for s in tree_state if isinstance(s, holotx.transforms.ScaleByTAdamState)]
    (flat_moments,) = [s for s in flat_state if isinstance(s, holotx.transforms.ScaleByTAdamState)]
    pairs = [(layout.unflatten(flat_params), tree_params, "param"),
             (layout.unflatten(list(flat_moments.mu)), tree_moments.mu, "mu")]
    for flat, tree_, what in pairs:
        for key in ("half", "h"):
            got, want = flat[key].double(), tree_[key].double()
            ulp = 2.0 ** -7 * want.abs().clamp(min=2.0 ** -126)  # bfloat16's spacing at each value
            assert ((got - want).abs() <= ulp).all(), (what, key)
            differ = (got != want).double().mean().item()
            assert differ <= 0.05, f"{what} {key}: {differ:.0%} of the values differ"


CHANNEL_SHAPES = [(4, 3, 7, 7), (7,), (0, 3), (6, 5), (3, 1, 1, 1), (2, 40), (), (0,), (1, 300), (9, 2, 3),
                  (64, 1)]
"""Output channels of 147 values (ResNet-50's first conv), 5, 1, 40, 300 and 6 (shorter
than a row and longer, none a multiple of 16), 1-D, 0-d and empty tensors (one channel
each). In rows of 4 no row holds more than 4 channels; in rows of 16 or 256, the 64
channels of one value fill rows."""


def _channel_counts(tensors):
    """The channels of each tensor: its output channels, or one for a tensor of fewer than two
    dimensions or none of values."""
    return [t.shape[0] if t.dim() >= 2 and t.numel() else 1 for t in tensors]


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("align", [4, 16, 256])
def test_channel_sums_and_per_channel_follow_output_channels(align):
    """Per-channel sums over an aligned buffer are the sums of ``p.reshape(p.shape[0], -1)``'s
    rows (a tensor of fewer than two dimensions, or empty, is one channel), whether channels
    start on rows or inside them; per_channel spreads one value per channel back over the
    same positions (a tensor's padding taking its last channel's), eager (repeat_interleave)
    and compiled, no repeat_interleave in the graph: choosing among each row's channels by
    comparisons (rows of 4), or gathering each position's value (rows of 16 and 256, where
    rows hold more than 8 channels)."""
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in CHANNEL_SHAPES]
    layout = FlatLayout(tensors, align=align)
    (buffer,) = layout.flatten(tensors)
    (segments,) = layout.segments()
    channels = segments.channels
    assert channels.most_per_row == {4: 4, 16: 16, 256: 64}[align]
    rows = segments.row_ids.shape[0]
    # The comparisons' tables are the layout's, built once (empty where the gather is used).
    chained = channels.most_per_row <= 8
    assert channels.row_slots.shape == ((rows, 4) if chained else (0, channels.most_per_row))
    assert channels.row_starts.shape == ((rows, 3) if chained else (0, channels.most_per_row - 1))
    assert channels.row_starts.dtype == torch.int32
    assert torch.equal(channels.row_sizes, channels.sizes[segments.row_ids])
    expected = torch.cat([t.reshape(n, -1).sum(1) for t, n in zip(tensors, _channel_counts(tensors))])
    torch.testing.assert_close(channel_sums(buffer, segments), expected, rtol=1e-14, atol=1e-14)

    values = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    want = []
    for t, v in zip(tensors, torch.split(values, _channel_counts(tensors))):
        padded = -(-t.numel() // align) * align
        per_value = v.repeat_interleave(t.numel() // len(v)) if t.numel() else v[:0]
        want.append(torch.cat([per_value, v[-1].expand(padded - t.numel())]))
    want = torch.cat(want)
    assert torch.equal(per_channel(values, segments).reshape(-1), want)
    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(lambda v: per_channel(v, segments), backend=counting, fullgraph=True)
    assert torch.equal(compiled(values).reshape(-1), want)
    assert "repeat_interleave" not in graphs[0].code, "the compiled path computes each position's channel"


ADAMP_CASES = {"channel": (4, 3, 7, 7), "layer": (6, 5), "neither": (3, 2, 3, 3), "long_channels": (2, 40),
               "bias": (7,), "scalar": (), "empty": (0, 3)}
"""The params of the official AdamP tests, by the case :func:`_adamp_grads` puts them in:
output channels of 147 values (ResNet-50's first conv), 5, 18 and 40, none a multiple of
the rows' 16 values; a 1-D, a 0-d and an empty tensor, never projected."""


def _adamp_grads(params, gen, dtype):
    """Gradients that put each param of :data:`ADAMP_CASES` in its case, away from the
    thresholds: ``channel`` and ``long_channels`` orthogonal to each output channel (the
    channel test projects); ``layer`` with its channels alternately along and against the
    param by the same dot product, cancelling over the tensor (the channel test fails,
    the whole-tensor one projects); ``neither`` along the param; the others random."""
    grads = {}
    for name, p in params.items():
        p = p.double()
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name in ("channel", "long_channels", "layer"):
            rows, r = p.reshape(p.shape[0], -1), noise.reshape(p.shape[0], -1)
            squares = (rows * rows).sum(1, keepdim=True)
            g = r - (r * rows).sum(1, keepdim=True) / squares * rows
            if name == "layer":
                signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(p.shape[0] // 2).unsqueeze(1)
                g = g + signs * rows / squares  # a dot product of +-1 with each channel
            noise = g.reshape(p.shape)
        elif name == "neither":
            noise = p + 0.1 * noise
        grads[name] = noise.to(dtype)
    return grads


def _adamp_case(p, g, delta=0.1, eps=1e-8):
    """Which test projects ``p``'s update, by the official rule: ``"channel"``, ``"layer"``,
    ``"neither"``, or ``"none"`` for a tensor of fewer than two dimensions or no values."""
    if p.dim() < 2 or not p.numel():
        return "none"
    rp, rg = p.double().reshape(p.shape[0], -1), g.double().reshape(p.shape[0], -1)
    cos = (rp * rg).sum(1).abs() / (rp.norm(dim=1).clamp(min=eps) * rg.norm(dim=1).clamp(min=eps))
    if cos.max() < delta / math.sqrt(rp.shape[1]):
        return "channel"
    layer = (rp * rg).sum().abs() / (rp.norm().clamp(min=eps) * rg.norm().clamp(min=eps))
    return "layer" if layer < delta / math.sqrt(p.numel()) else "neither"


def _adamp_over_segments_and_tree(tx, dtype, steps):
    """``steps`` of ``tx`` over the :data:`ADAMP_CASES` params, as a tree and as one aligned
    flat buffer (rows of 16) with segments, on the same gradients; each step's cases
    checked. Returns both runs' params and Adam states, the flat ones as trees."""
    gen = torch.Generator().manual_seed(6)
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in ADAMP_CASES.items()}
    layout = FlatLayout(params, align=16)
    tree_state, flat_params = tx.init(params), layout.flatten(params)
    flat_state = tx.init(flat_params)
    step = make_step(tx, donate=True)
    want = {"channel": "channel", "long_channels": "channel", "layer": "layer", "neither": "neither"}
    for _ in range(steps):
        grads = _adamp_grads(params, gen, dtype)
        cases = {k: _adamp_case(params[k], grads[k]) for k in params}
        assert cases == {k: want.get(k, "none") for k in params}, cases
        updates, tree_state = tx.update(grads, tree_state, params)
        params = holotx.apply_updates(params, updates)
        flat_params, flat_state = step(flat_params, layout.flatten(grads), flat_state,
                                       segments=layout.segments())
    (tree_adam,) = [s for s in tree_state if isinstance(s, holotx.transforms.ScaleByAdamState)]
    (flat_adam,) = [s for s in flat_state if isinstance(s, holotx.transforms.ScaleByAdamState)]
    moments = ("mu", "nu") + (("nu_max",) if tree_adam.nu_max is not None else ())
    tree_run = {"params": params, **{m: getattr(tree_adam, m) for m in moments}}
    flat_run = {"params": layout.unflatten(flat_params),
                **{m: layout.unflatten(list(getattr(flat_adam, m))) for m in moments}}
    assert {int(c) for c in holotx.tree.flatten(tree_adam.count)[0] if c is not None} == {steps}
    assert [int(c) for c in flat_adam.count] == [steps]
    return tree_run, flat_run


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1, decoupled_weight_decay=True),
                                    dict(weight_decay=0.05, wd_ratio=0.3, decoupled_weight_decay=True,
                                         nesterov=True, amsgrad=True)],
                         ids=["decoupled_decay", "nesterov_amsgrad"])
def test_official_adamp_over_segments_equals_the_tree(kwargs):
    """AdamP's official projection over an aligned flat buffer: each tensor projected per
    output channel, as a whole, or not at all, as the tree path decides, channels shorter
    and longer than a row and not starting on rows; the decay scaled by ``wd_ratio`` where
    projected. Float64, params and state equal to rounding after 6 steps."""
    tree_run, flat_run = _adamp_over_segments_and_tree(holotx.adamp(1e-2, **kwargs), torch.float64, 6)
    for what in tree_run:
        for key, value in tree_run[what].items():
            torch.testing.assert_close(flat_run[what][key], value, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, what=what, key=key: f"{what} {key}: {m}")


@pytest.mark.usefixtures("fresh_dynamo")
def test_official_adamp_over_segments_compiles_with_inductor():
    """Inductor's step over the flat buffer is the eager flat step (float64, to rounding),
    in one graph. Rows of 16 hold at most 4 of these channels: each value's factor is
    chosen among its row's by comparisons, not gathered."""
    gen = torch.Generator().manual_seed(8)
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in ADAMP_CASES.items()}
    layout = FlatLayout(params, align=16)
    segments = layout.segments()
    assert segments[0].channels.most_per_row == 4
    tx = holotx.adamp(1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    eager_params, compiled_params = layout.flatten(params), layout.flatten(params)
    eager_state, compiled_state = tx.init(eager_params), tx.init(compiled_params)
    step = make_step(tx, donate=True)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(step, backend=counting, fullgraph=True)
    for _ in range(3):
        grads = layout.flatten(_adamp_grads(params, gen, torch.float64))
        _, eager_state = step(eager_params, [g.clone() for g in grads], eager_state, segments=segments)
        _, compiled_state = compiled(compiled_params, grads, compiled_state, segments=segments)
        params = layout.unflatten(eager_params)
    torch.testing.assert_close(compiled_params, eager_params, rtol=1e-12, atol=1e-14)
    assert len(graphs) == 1


def _bf16_spacing(x):
    """bfloat16's spacing (one ulp) at each value of ``x``, as float64."""
    return torch.exp2(torch.floor(torch.log2(x.double().abs().clamp(min=2.0 ** -126))) - 7)


def test_official_adamp_over_segments_in_bfloat16():
    """bfloat16: the flat step is the tree step within a bf16 ulp, its moments equal (they
    come before the projection). The tree path's per-channel sums are bfloat16 values, the
    flat path's float32 then float64, and the flat path applies the projection and the
    decay as one factor where the tree path rounds after each: a param may round the other
    way. After one step: at most one ulp of the value, on at most 5% of the values. After
    eight (each step's difference fed back through the params): at most one ulp of the
    tensor's largest value (values near 0 may be several of their own ulps apart), on at
    most 15% of the values."""
    for steps, per_value, share in ((1, True, 0.05), (8, False, 0.15)):
        tree_run, flat_run = _adamp_over_segments_and_tree(
            holotx.adamp(1e-2, weight_decay=0.1, decoupled_weight_decay=True), torch.bfloat16, steps)
        for key, want in tree_run["params"].items():
            if not want.numel():
                continue
            got = flat_run["params"][key]
            ulp = _bf16_spacing(want) if per_value else _bf16_spacing(want.abs().max())
            assert ((got.double() - want.double()).abs() <= ulp).all(), (steps, key)
            differ = (got != want).double().mean().item()
            assert differ <= share, f"{steps} steps, {key}: {differ:.0%} of the values differ"
        for what in ("mu", "nu"):
            for key, want in tree_run[what].items():
                assert torch.equal(flat_run[what][key], want), (steps, what, key)


def test_lerp_rows_keeps_a_float32_weight_for_half_buffers():
    """The per-row lerp with float32 weights on a bfloat16 buffer is the float32 lerp,
    rounded once (what the per-tensor ops do with a Python-float weight)."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 8, generator=gen).bfloat16(), torch.randn(4, 8, generator=gen).bfloat16()
    w = torch.rand(4, 1, generator=gen)
    expected = torch.lerp(x.float(), y.float(), w).bfloat16()
    assert torch.equal(holotx.ops.lerp_rows([x.reshape(-1)], [y.reshape(-1)], [w])[0], expected.reshape(-1))


def test_official_adamp_needs_the_channels_of_its_segments():
    """AdamP's official projection takes cosines per output channel: segments that do not
    say where the channels lie (made by hand) are refused by name, before anything is
    written; Holocron's whole-tensor projection runs without them."""
    params = {"w": torch.randn(5, 3), "b": torch.randn(7)}
    layout = FlatLayout(params, align=4)
    flat = layout.flatten(params)
    bare = [seg._replace(channels=None) for seg in layout.segments()]
    tx = holotx.adamp(1e-2)
    state = tx.init(flat)
    before = [x.clone() for x in holotx.tree.flatten(state)[0] if x is not None]
    with pytest.raises(ValueError, match="do not say where the channels lie"):
        make_step(tx, donate=True)(flat, [torch.ones_like(b) for b in flat], state, segments=bare)
    after = [x for x in holotx.tree.flatten(state)[0] if x is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the donated state was written"
    holocron = holotx.adamp(1e-2, compat="holocron")
    holocron.update(flat, holocron.init(flat), flat, segments=bare)


def test_segments_refuse_a_mask_and_a_wrong_count():
    params = {"w": torch.randn(5, 3), "b": torch.randn(7)}
    layout = FlatLayout(params, align=4)
    flat = layout.flatten(params)
    masked = holotx.lamb(1e-2, trust_ratio_mask=[True])
    with pytest.raises(ValueError, match="mask cannot be combined"):
        masked.update(flat, masked.init(flat), flat, segments=layout.segments())
    tx = holotx.lamb(1e-2)
    with pytest.raises(ValueError, match="segments has 2 entries for 1 flat buffers"):
        tx.update(flat, tx.init(flat), flat, segments=layout.segments() * 2)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["lamb", "tadam", "adamp"])
def test_per_tensor_rule_over_segments_compiles_to_one_graph(name):
    """The segmented fast path compiles without graph breaks and gives the eager numbers;
    new grad buffers at every step (autograd's) reuse the one graph."""
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(3, generator=gen)}
    layout = FlatLayout(params, align=8)
    tx = SEGMENTED[name]()
    eager_params, compiled_params = layout.flatten(params), layout.flatten(params)
    eager_state, compiled_state = tx.init(eager_params), tx.init(compiled_params)
    step = make_step(tx, donate=True)
    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=counting)
    segments = layout.segments()
    for _ in range(3):
        grads = layout.flatten({k: torch.randn(v.shape, generator=gen) for k, v in params.items()})
        _, eager_state = step(eager_params, [g.clone() for g in grads], eager_state, segments=segments)
        _, compiled_state = compiled(compiled_params, grads, compiled_state, segments=segments)
    torch.testing.assert_close(compiled_params, eager_params, rtol=1e-6, atol=1e-7)
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 steps: a recompile per step"


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_step_compiles_once_in_a_fresh_thread():
    """The executor's per-thread state exists from a thread's start: the first step must
    not leave behind anything the compiled step's guards see differently at the second
    (it used to compile twice in every new thread)."""
    import threading

    graphs, errors = [], []
    aot_eager = lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def train():
        try:
            params = [torch.randn(7), torch.randn(3)]
            layout = FlatLayout(params)
            tx = holotx.adabelief(1e-2)
            flat = layout.flatten(params)
            state = tx.init(flat)
            step = torch.compile(make_step(tx, donate=True), backend=counting, fullgraph=True)
            for _ in range(3):
                _, state = step(flat, layout.flatten([torch.randn(7), torch.randn(3)]), state)
        except Exception as err:  # reported below, from the test's own thread
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert not errors, errors
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 steps"


DEFERRED = {
    "adamw": lambda: holotx.adamw(1e-2, weight_decay=0.1),
    "lamb-schedule": lambda: holotx.lamb(holotx.linear_schedule(1e-2, 1e-3, 5), weight_decay=0.1),
    "lars-momentum": lambda: holotx.lars(0.1, momentum=0.9),
    "inject-adan": lambda: holotx.inject_hyperparams(holotx.adan)(lr=1e-2, weight_decay=0.02),
    "masked-sgd": lambda: holotx.masked(holotx.sgd(0.1, momentum=0.9), {"w": True, "b": False}),
    "partition": lambda: holotx.partition({"a": holotx.adabelief(1e-2), "s": holotx.sgd(0.1)},
                                          {"w": "a", "b": "s"}),
    "apply_if_finite": lambda: holotx.apply_if_finite(holotx.ademamix(1e-2), 2),
    "multi_steps": lambda: holotx.multi_steps(holotx.tadam(1e-2), every_k=2),
}


@pytest.mark.parametrize("name", list(DEFERRED))
def test_donated_step_with_deferred_learning_rate_equals_pure_step(name):
    """The donated step lets a chain's final scaling (the learning rate) be applied as
    ``p += factor * u``; every composition still takes the pure step's values."""
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
              "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    tx = DEFERRED[name]()
    pure_params, pure_state = params, tx.init(params)
    donated_params = {k: v.clone() for k, v in params.items()}
    donated_state = tx.init(donated_params)
    pure_step, donated_step = make_step(tx), make_step(tx, donate=True)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        pure_params, pure_state = pure_step(pure_params, grads, pure_state)
        donated_params, donated_state = donated_step(donated_params, {k: g.clone() for k, g in grads.items()},
                                                     donated_state)
        for key in params:
            torch.testing.assert_close(donated_params[key], pure_params[key], rtol=1e-14, atol=1e-15)


def test_final_scale_reaches_only_a_chains_last_scaling():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    grads = {"w": torch.full((3,), 2.0, dtype=torch.float64)}
    def handed_over(tx):
        updates, _, factor, _ = executor.run(tx, grads, tx.init(params), params, hand_over_scale=True)
        return updates, factor

    updates, factor = handed_over(holotx.sgd(0.5))
    assert factor == -0.5
    assert torch.equal(updates["w"], grads["w"])  # left for the caller to scale
    updates, factor = handed_over(holotx.masked(holotx.sgd(0.5), {"w": True}))
    assert factor is None  # a mask must not let its inner scaling reach other leaves
    assert torch.equal(updates["w"], -0.5 * grads["w"])
    updates, factor = handed_over(holotx.chain(holotx.scale(3.0), holotx.identity()))
    assert factor is None
    assert torch.equal(updates["w"], 3.0 * grads["w"])


@pytest.mark.parametrize("name", ["lookahead", "scout"])
def test_a_compiled_flat_step_given_host_decisions_compiles_a_graph_per_flag(name):
    """torch.compile(make_step(tx, donate=True)) over flat buffers, called with
    ``decisions=host_decisions(...)``: two graphs over three windows (one synchronises, one
    does not and does not take the slow weights), equal to the eager tree step."""
    import torch._dynamo.testing

    from holotx.flat import host_decisions

    def wrap():
        inner = holotx.adam(0.05)
        return holotx.lookahead(inner, 0.5, 3) if name == "lookahead" else holotx.scout(inner, 0.3, 3)

    gen = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(5, 4, generator=gen, dtype=torch.float64),
              "b": torch.randn(4, generator=gen, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
             for _ in range(9)]
    tx = wrap()
    tree_params, tree_state = params, tx.init(params)
    for g in grads:
        updates, tree_state = tx.update(g, tree_state, tree_params)
        tree_params = holotx.apply_updates(tree_params, updates)

    layout = FlatLayout(params, align=4)
    flat_params = layout.flatten(params)
    flat_state = tx.init(flat_params)
    segments = layout.segments()
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(make_step(tx, donate=True), backend=counting, fullgraph=True)
    for g in grads:
        decisions = host_decisions(tx, flat_state, flat_params)
        flat_params, flat_state = step(flat_params, layout.flatten(g), flat_state, decisions=decisions,
                                       segments=segments)
    torch._dynamo.reset()
    assert len(graphs) == 2
    quiet = [n.name for n in graphs[0].graph.nodes if n.op == "placeholder"]  # named after their sources
    assert not [x for x in quiet if "slow" in x], quiet
    got = layout.unflatten(flat_params)
    for key in params:
        torch.testing.assert_close(got[key], tree_params[key], rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("fresh_dynamo")
def test_segment_sums_of_one_tensor_compile_with_inductor():
    """A buffer holding one tensor of several rows: its sum by segments, and by channels
    (a 1-D tensor is one), compile with inductor (a scatter-add into a one-element buffer
    fails inductor's code generation)."""
    (x,) = params = [torch.randn(8 * 16, dtype=torch.float64)]
    layout = FlatLayout(params, align=16)
    (segments,) = layout.segments()
    (buffer,) = layout.flatten(params)
    compiled = torch.compile(lambda b: (segment_sums(b * b, segments), channel_sums(b * b, segments)),
                             fullgraph=True)
    for sums in compiled(buffer):
        torch.testing.assert_close(sums, (x * x).sum().reshape(1))
