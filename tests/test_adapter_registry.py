"""The registry (create_optimizer, list_optimizers, register_optimizer) and the
param-group helper of holotx.adapters."""

from __future__ import annotations

import pytest
import torch

import holotx
from holotx.adapters import (
    Lookahead,
    Scout,
    TransformOptimizer,
    create_optimizer,
    list_optimizers,
    param_groups_weight_decay,
    register_optimizer,
)
from holotx.adapters import registry as registry_module

ALL = ["adabelief", "adam", "adamp", "adamw", "adan", "ademamix", "lamb", "lars", "radam", "ralars", "sgd",
       "tadam"]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.norm = torch.nn.BatchNorm2d(2)
        self.head = torch.nn.Linear(8, 1)
        self.scale = torch.nn.Parameter(torch.ones(3))
        self.frozen = torch.nn.Parameter(torch.ones(2, 2), requires_grad=False)


def test_list_optimizers_all_and_patterns():
    assert list_optimizers() == ALL
    assert list_optimizers("ada*") == ["adabelief", "adam", "adamp", "adamw", "adan"]
    assert list_optimizers("ADA*") == list_optimizers("ada*")  # case-insensitive
    assert list_optimizers("*lars") == ["lars", "ralars"]
    assert list_optimizers("nothing*") == []
    wrapped = list_optimizers("lookahead_*", wrappers=True)
    assert wrapped == [f"lookahead_{n}" for n in ALL]
    assert "scout_lamb" in list_optimizers(wrappers=True)
    assert "lookahead_lamb" not in list_optimizers()


@pytest.mark.parametrize("name", ALL)
def test_create_optimizer_every_name_builds_the_factory(name):
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(model, name, lr=0.01, filter_bias_and_norm=False)
    assert isinstance(opt, TransformOptimizer)
    assert opt._factory is getattr(holotx, name)
    assert all(g["lr"] == 0.01 for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # TAdam's first step is near zero
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_create_optimizer_names_are_case_insensitive_and_either_order():
    model = torch.nn.Linear(3, 2)
    assert create_optimizer(model, "LAMB")._factory is holotx.lamb
    assert create_optimizer("AdEMAMix", model)._factory is holotx.ademamix
    params = list(model.parameters())
    opt = create_optimizer(params, "adam", lr=0.1)
    assert [p for g in opt.param_groups for p in g["params"]] == params


def test_create_optimizer_typo_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean 'lamb'"):
        create_optimizer(torch.nn.Linear(2, 2), "lamn")
    with pytest.raises(ValueError, match="did you mean 'lamb'"):
        create_optimizer(torch.nn.Linear(2, 2), "lookahead_lanb")
    with pytest.raises(ValueError, match="unknown optimizer 'zzz'"):
        create_optimizer(torch.nn.Linear(2, 2), "zzz")


@pytest.mark.parametrize(("prefix", "cls"), [("lookahead", Lookahead), ("scout", Scout)])
def test_create_optimizer_wrapper_prefix(prefix, cls):
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(model, f"{prefix}_adamw", lr=0.01, sync_period=3, sync_rate=0.3)
    assert isinstance(opt, cls)
    assert isinstance(opt.base_optimizer, TransformOptimizer)
    assert opt.base_optimizer._factory is holotx.adamw
    assert (opt.sync_period, opt.sync_rate) == (3, 0.3)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_create_optimizer_bad_hyperparameters_name_the_argument():
    with pytest.raises(ValueError, match="lr"):
        create_optimizer(torch.nn.Linear(2, 2), "lamb", lr=-1.0)
    with pytest.raises(ValueError, match="bogus"):
        create_optimizer(torch.nn.Linear(2, 2), "adamw", bogus=1)


def test_param_groups_weight_decay_splits_weights_from_biases_and_norms():
    net = Net()
    groups = param_groups_weight_decay(net, 0.05)
    plain, decayed = groups
    assert plain["weight_decay"] == 0.0
    assert plain["trust_ratio_mask"] is False
    assert decayed["weight_decay"] == 0.05
    assert "trust_ratio_mask" not in decayed
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decayed["params"]) == ids([net.conv.weight, net.head.weight])
    expected = [net.conv.bias, net.norm.weight, net.norm.bias, net.head.bias, net.scale]
    assert ids(plain["params"]) == ids(expected)
    # frozen params are left out of both
    assert id(net.frozen) not in ids(plain["params"]) | ids(decayed["params"])


def test_param_groups_weight_decay_skip_list_and_no_weight_decay_convention():
    net = Net()
    net.no_weight_decay = lambda: {"head.weight"}  # timm's convention
    _plain, decayed = param_groups_weight_decay(net, 0.1)
    assert [id(p) for p in decayed["params"]] == [id(net.conv.weight)]
    groups = param_groups_weight_decay(net, 0.1, skip=["conv.weight"], exclude_from_trust_ratio=False)
    assert len(groups) == 1  # everything went to the plain group; the empty one is omitted
    assert groups[0]["weight_decay"] == 0.0
    assert "trust_ratio_mask" not in groups[0]
    assert len(groups[0]["params"]) == 7


def test_no_weight_decay_patterns_match_as_in_timm():
    """timm reads ``no_weight_decay()`` entries as fnmatch patterns (XCiT returns
    ``'pos_embed.*'``): a matching weight goes to the plain group; a name still matches
    itself only."""

    class WithPatterns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Linear(3, 3)
            self.pos_embedding = torch.nn.Linear(3, 3)
            self.head = torch.nn.Linear(3, 2)

        def no_weight_decay(self):
            return {"pos_embed.*", "head.weight"}

    net = WithPatterns()
    plain, decayed = param_groups_weight_decay(net, 0.1)
    assert {id(p) for p in decayed["params"]} == {id(net.pos_embedding.weight)}
    assert id(net.pos_embed.weight) in {id(p) for p in plain["params"]}
    assert id(net.head.weight) in {id(p) for p in plain["params"]}


def test_trust_ratio_is_off_in_the_plain_group():
    """With LAMB from create_optimizer, a bias moves like Adam (ratio 1), a weight by the
    trust ratio."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = create_optimizer(model, "lamb", lr=0.1, weight_decay=0.01)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}
    bias_group = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert bias_group["params"] == [model.bias]
    assert bias_group["trust_ratio_mask"] is False
    bias = model.bias.detach().clone()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    g = model.bias.grad.clone()
    opt.step()
    # LAMB's first bias-corrected step is g/|g| elementwise (ratio 1): lr * sign(g), to eps
    torch.testing.assert_close(model.bias.detach(), bias - 0.1 * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-6)


def test_create_optimizer_without_decay_or_trust_keeps_one_group():
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(model, "adam", lr=0.1)  # adam: weight_decay 0, no trust ratio
    assert len(opt.param_groups) == 1
    opt = create_optimizer(model, "adamw", lr=0.1)  # adamw's default decay 1e-2: two groups
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    assert all("trust_ratio_mask" not in g for g in opt.param_groups)


def test_register_optimizer(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    def my_sgd(lr: holotx.ops.Scalar = 0.1) -> holotx.GradientTransformation:
        return holotx.sgd(lr=lr)

    register_optimizer("MySGD", my_sgd)
    assert "mysgd" in list_optimizers()
    opt = create_optimizer(torch.nn.Linear(2, 2), "mysgd", lr=0.5)
    assert opt._factory is my_sgd
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="registered already"):
        register_optimizer("mysgd", my_sgd)
    register_optimizer("mysgd", my_sgd, overwrite=True)
    with pytest.raises(ValueError, match="wrapper prefix"):
        register_optimizer("lookahead_x", my_sgd)
    with pytest.raises(ValueError, match="callable"):
        register_optimizer("x", 3)


def test_a_transform_built_optimizer_refuses_group_hyperparameters_it_would_ignore():
    """Its groups take only lr and maximize: a weight_decay there (the HF Trainer's and
    timm's groups carry one) would be silently ignored, so it is refused by name, and the
    optimizer is left as it was."""
    from holotx.adapters import TransformOptimizer

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="weight_decay"):
        TransformOptimizer(param_groups_weight_decay(model, 0.1), holotx.adamw(1e-3))
    opt = TransformOptimizer([model.weight], holotx.adamw(1e-3), lr=0.5)
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [model.bias], "betas": (0.9, 0.99)})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [model.bias], "lr": 0.1, "initial_lr": 0.1})  # a scheduler's key is fine
