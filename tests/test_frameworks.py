"""holotx's optimizers driven by the frameworks people train with: PyTorch Lightning (fit,
LearningRateMonitor, checkpoint and resume, gradient clipping and accumulation) and the
HuggingFace Trainer (its scheduler, checkpoint and resume). Each runs a few steps of a tiny
model on the CPU and compares with an uninterrupted run, bit for bit.

The frameworks are the ``frameworks`` extra (installed by ``make venv``); without them
these tests skip."""

from __future__ import annotations

import functools
import logging
import warnings

import pytest
import torch

import holotx
from holotx.adapters import TransformOptimizer

DIM = 6


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(DIM, 1, generator=gen, dtype=torch.float64) + 0.1
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- PyTorch Lightning -----------------------------------------------------------------------


@pytest.fixture
def lightning():
    pl = pytest.importorskip("lightning.pytorch")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    return pl


def _lightning_module(pl, factory, scheduler=None):
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = factory(self.parameters())
            if scheduler is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"}}

    return Tiny()


def _loader():
    x, y = _data()
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False)


def _trainer(pl, tmp_path, max_steps, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1,
                          logger=kwargs.pop("logger", False),
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                          num_sanity_val_steps=0, **kwargs)


def _fit(trainer, module, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a few loader workers, a small dataset: Lightning's advice)
        trainer.fit(module, _loader(), **kwargs)


LIGHTNING_CASES = {
    "lamb": functools.partial(holotx.adapters.LAMB, lr=1e-2, weight_decay=0.01),
    "adamw": lambda ps: TransformOptimizer(ps, holotx.adamw, lr=1e-2),
    "lookahead_lars": lambda ps: holotx.adapters.Lookahead(holotx.adapters.LARS(ps, lr=0.1, momentum=0.9)),
}


@pytest.mark.parametrize("name", sorted(LIGHTNING_CASES))
def test_lightning_fit_equals_a_plain_loop(lightning, tmp_path, name):
    """Lightning's fit (with gradient clipping and accumulation) takes the same steps as the
    loop it stands for."""
    factory = LIGHTNING_CASES[name]
    module = _lightning_module(lightning, factory)
    _fit(_trainer(lightning, tmp_path, 4, gradient_clip_val=0.5, accumulate_grad_batches=2), module)

    model = _model()
    opt = factory(model.parameters())
    batches = list(_loader())
    for step in range(4):
        opt.zero_grad()
        for x, y in batches[(2 * step) % 4:(2 * step) % 4 + 2]:
            # Lightning scales each micro-batch's loss by 1/accumulate.
            (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    for got, expected in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=0, atol=1e-14)


def test_lightning_checkpoint_resume_is_bit_for_bit(lightning, tmp_path):
    """ModelCheckpoint mid-run, then a new Trainer resuming from it, ends where an
    uninterrupted fit does; LearningRateMonitor logs the scheduler's lr."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    factory = functools.partial(holotx.adapters.LAMB, lr=1e-2, weight_decay=0.01)

    def scheduler(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    whole = _lightning_module(lightning, factory, scheduler)
    _fit(_trainer(lightning, tmp_path / "whole", 8), whole)

    first = _lightning_module(lightning, factory, scheduler)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    monitor = LearningRateMonitor(logging_interval="step")
    logger = CSVLogger(tmp_path / "logs")
    _fit(_trainer(lightning, tmp_path / "first", 4, callbacks=[saver, monitor], logger=logger,
                  log_every_n_steps=1), first)
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = _lightning_module(lightning, factory, scheduler)
    _fit(_trainer(lightning, tmp_path / "second", 8), resumed, ckpt_path=str(ckpt))
    for a, b in zip(whole.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    metrics = next((tmp_path / "logs").rglob("metrics.csv"))
    logged = [line.split(",") for line in metrics.read_text().splitlines()]
    column = logged[0].index("lr-LAMB")
    lrs = [float(row[column]) for row in logged[1:] if row[column]]
    assert lrs == [1e-2, 1e-2, 5e-3, 5e-3]


# -- HuggingFace Trainer ---------------------------------------------------------------------


@pytest.fixture
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    return transformers


class _Regression(torch.nn.Module):
    """A model as the HF Trainer calls it: keyword inputs, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_run(hf, tmp_path, optimizer_factory, max_steps, *, resume_from=None, save_steps=None,
            own_scheduler=True):
    model = _Regression()
    opt = optimizer_factory(model.parameters())
    # Without a scheduler of ours, the Trainer makes its own (linear decay to 0).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)) if own_scheduler else None
    args = hf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, max_grad_norm=1.0)
    trainer = hf.Trainer(model=model, args=args, train_dataset=_Rows(), optimizers=(opt, sched))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume_from)
    return model, opt


HF_CASES = {
    "adamw": lambda ps: TransformOptimizer(ps, holotx.adamw, lr=1e-2, weight_decay=0.01),
    "adan": lambda ps: holotx.adapters.Adan(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_hf_trainer_resume_mid_run_is_bit_for_bit(hf, tmp_path, name):
    """The Trainer with optimizers=(holotx optimizer, torch scheduler): a run resumed from
    its step-3 checkpoint (optimizer and scheduler state saved by the Trainer) ends
    exactly where an uninterrupted run ends."""
    factory = HF_CASES[name]
    whole, _ = _hf_run(hf, tmp_path / "whole", factory, 6)
    _hf_run(hf, tmp_path / "first", factory, 6, save_steps=3)
    resumed, opt = _hf_run(hf, tmp_path / "second", factory, 6,
                           resume_from=str(tmp_path / "first" / "checkpoint-3"))
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 7)  # the scheduler stepped 6 times


def test_hf_trainer_with_a_holotx_schedule_as_lr(hf, tmp_path):
    """A holotx schedule as lr under the Trainer's own linear scheduler: the two compose
    (the step's lr is the schedule's value times the Trainer's factor), and a run resumed
    from its checkpoint ends exactly where an uninterrupted one does."""
    schedule = holotx.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)

    def factory(ps):
        return TransformOptimizer(ps, holotx.adamw, lr=schedule, weight_decay=0.01)

    whole, opt = _hf_run(hf, tmp_path / "whole", factory, 6, own_scheduler=False)
    _hf_run(hf, tmp_path / "first", factory, 6, save_steps=3, own_scheduler=False)
    resumed, _ = _hf_run(hf, tmp_path / "second", factory, 6, own_scheduler=False,
                         resume_from=str(tmp_path / "first" / "checkpoint-3"))
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # After 6 steps the Trainer's linear factor is 0: the lr the next step would use.
    assert float(opt.param_groups[0]["lr"]) == 0.0
    assert isinstance(opt.param_groups[0]["lr"], float)
