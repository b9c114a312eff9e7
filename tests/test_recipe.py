"""The training recipe's building blocks: optimizers, warm-up + decay, weight average, stability warnings."""

from __future__ import annotations

import math

import pytest
import torch

from seg.config import build_config
from seg.model import UNet
from seg.training import history, state
from seg.training.ema import ModelEMA
from seg.training.optim import (StepSchedule, build_optimizer, build_scheduler, lr_factor, step_epoch,
                                step_per_batch)


def _model():
    torch.manual_seed(0)
    return UNet(1, base_channels=4)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_build_optimizer_kinds(name, cls):
    opt = build_optimizer(_model(), 1e-3, 1e-4, name)
    assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 1e-4
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="optimizer='lamb' is not valid"):
        build_optimizer(_model(), 1e-3, 0, "lamb")


def test_lr_factor_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, "cosine") == 1.0
    assert lr_factor(52, 100, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(52, 100, 4, "poly") == pytest.approx(0.5 ** 0.9)
    assert lr_factor(99, 100, 4, "none") == 1.0
    cos = [lr_factor(s, 100, 4, "cosine") for s in range(4, 101)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))


def test_step_schedule_steps_per_batch_and_resumes():
    cfg = build_config(overrides=["train.warmup_epochs=1", "train.scheduler=cosine", "train.epochs=3",
                                  "train.lr=0.1"])
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    sched = build_scheduler(cfg.train, opt, steps_per_epoch=5)
    assert isinstance(sched, StepSchedule) and step_per_batch(sched)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5] == pytest.approx(0.1) and lrs[-1] < 0.01
    step_epoch(sched, 0.5)  # per-step schedules ignore the epoch end
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(15, 15, 5, "cosine"))
    opt2 = torch.optim.SGD(_model().parameters(), lr=0.1)
    again = build_scheduler(cfg.train, opt2, steps_per_epoch=5)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == sched.last_epoch == 15


def test_without_warmup_the_per_epoch_schedules_are_kept():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    plateau = build_scheduler(build_config().train, opt, 5)
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau) and not step_per_batch(plateau)
    cosine = build_scheduler(build_config(overrides=["train.scheduler=cosine", "train.epochs=4"]).train, opt, 5)
    assert isinstance(cosine, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert build_scheduler(build_config(overrides=["train.scheduler=none"]).train, opt, 5) is None
    with pytest.raises(ValueError, match="train.warmup_epochs=1.0 needs train.scheduler none, cosine or poly"):
        build_config(overrides=["train.warmup_epochs=1", "train.scheduler=plateau"])


def test_ema_averages_weights_and_buffers_with_the_ramp():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.inc.block[1].running_mean.add_(2.0)
        model.inc.block[1].num_batches_tracked.add_(7)
    ema.update(model)
    d = min(0.9, 1 / 5)  # the ramp after one update: n / (n + 4)
    avg = ema.module.state_dict()
    w = "inc.block.0.weight"
    assert torch.allclose(avg[w], start[w] + (1 - d) * 1.0, atol=1e-6)
    rm = "inc.block.1.running_mean"
    assert torch.allclose(avg[rm], start[rm] + (1 - d) * 2.0, atol=1e-6)
    assert int(avg["inc.block.1.num_batches_tracked"]) == 7  # integer buffers are copied
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9
    assert torch.allclose(ema.module.state_dict()[w], model.state_dict()[w], atol=1e-6)  # converged


def test_ema_state_round_trip_and_bad_decay():
    model = _model()
    ema = ModelEMA(model, 0.99)
    with torch.no_grad():
        next(model.parameters()).mul_(3.0)
    ema.update(model)
    other = ModelEMA(_model(), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="EMA decay"):
            ModelEMA(model, bad)
    with pytest.raises(ValueError, match=r"train.ema_decay=1.0 is not valid; it must be >= 0 and < 1"):
        build_config(overrides=["train.ema_decay=1.0"])


def test_largest_drop_after_the_settling_epochs():
    dice = [0.19, 0.0, 0.19, 0.95, 0.97, 0.84, 0.02, 0.94]
    assert history.largest_drop(dice, 0) == (pytest.approx(0.95), 7)
    assert history.largest_drop(dice, 6) == (pytest.approx(0.95), 7)
    assert history.largest_drop([0.5, 0.6, 0.7], 0) == (0.0, 0)
    assert history.largest_drop(dice[:6], 2) == (pytest.approx(0.13), 6)


def test_stability_warnings_name_the_curve_and_epoch():
    rows = [{"epoch": i + 1, "dice": d, "raw_dice": r} for i, (d, r) in
            enumerate(zip([0.2, 0.9, 0.92, 0.93, 0.94], [0.1, 0.9, 0.5, 0.93, 0.94]))]
    out = history.stability_warnings(rows, epochs=5)
    assert len(out) == 1 and "raw weights fell to 0.5000 at epoch 3, 0.400 below its best so far (0.9000)" in out[0]
    assert out[0].startswith("note: ") and "the weight average, which is validated and saved, stayed" in out[0]
    both = [dict(r, dice=r["raw_dice"]) for r in rows]  # the selecting curve fell too: two warnings
    assert [line.split(":")[0] for line in history.stability_warnings(both, epochs=5)] == ["warning", "warning"]
    assert history.stability_warnings(rows, epochs=5, warmup_epochs=3) == []  # the drop is inside the warm-up
    steady = [{"epoch": i + 1, "dice": 0.5 + 0.01 * i} for i in range(10)]
    assert history.stability_warnings(steady, epochs=10) == []
    assert math.isclose(history.DROP_WARNING, 0.1)


def test_history_row_carries_the_raw_curve():
    report = {"global": {m: 0.5 for m in history.METRIC_NAMES}, "mean": {"dice": 0.4}}
    raw = ({"global": {"dice": 0.3}, "mean": {"dice": 0.2}}, 0.7)
    row = history.epoch_row(1, 0.1, 0.2, report, 1e-3, 1.0, 8, raw_report=raw)
    assert (row["raw_dice"], row["raw_mean_dice"], row["raw_val_loss"]) == (0.3, 0.2, 0.7)
    assert "raw_dice" not in history.epoch_row(1, 0.1, 0.2, report, 1e-3, 1.0, 8)


@pytest.mark.parametrize("override, message", [
    ("train.dice_reduction=pixel", "train.dice_reduction='pixel' is not valid; allowed values are 'batch', 'image'"),
    ("train.optimizer=lamb", "train.optimizer='lamb' is not valid; allowed values are 'adam', 'adamw', 'sgd'"),
    ("model.norm=layer", "model.norm='layer' is not valid; allowed values are 'batch', 'group', 'instance'"),
    ("data.augmentation=heavy", "data.augmentation='heavy' is not valid; allowed values are 'standard', 'strong'"),
    ("data.foreground_crop=2", "data.foreground_crop=2.0 is not valid; it must be >= 0 and <= 1"),
    ("train.warmup_epochs=-1", "train.warmup_epochs=-1.0 is not valid; it must be >= 0"),
])
def test_recipe_fields_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides=[override])


def test_batchnorm_recalibration_gives_the_average_its_own_statistics():
    torch.manual_seed(0)
    model = UNet(1, base_channels=4)
    ema = ModelEMA(model, 0.9)
    batches = [torch.randn(4, 1, 32, 32) * 3 + 2 for _ in range(3)]
    used = ema.recalibrate_batchnorm(iter(batches), lambda m, x: m(x))
    assert used == 3 and not ema.module.training
    first = ema.module.inc.block[1]
    x = torch.cat(batches)
    with torch.no_grad():
        act = ema.module.inc.block[0](x)  # the first convolution's output: what the first BatchNorm saw
    assert torch.allclose(first.running_mean, act.mean((0, 2, 3)), atol=1e-4)
    assert first.momentum == 0.1  # restored
    gn = ModelEMA(UNet(1, base_channels=4, norm="group"), 0.9)
    assert not gn.has_batchnorm() and gn.recalibrate_batchnorm(iter(batches), lambda m, x: m(x)) == 0


@pytest.mark.parametrize("select_on, stops_after", [("val_loss", 8), ("dice", 6), ("both", 8)])
def test_early_stopping_counts_what_is_selected_on(select_on, stops_after):
    p = state.Progress()
    dice = [0.5, 0.6, 0.7, 0.65, 0.66, 0.66, 0.66, 0.66, 0.66, 0.66]
    loss = [0.5, 0.4, 0.45, 0.41, 0.39, 0.395, 0.395, 0.395, 0.395, 0.395]
    for epoch, (d, v) in enumerate(zip(dice, loss)):
        p = state.after_epoch(p, epoch, d, v, epochs=10, early_stopping=3, select_on=select_on)
        if p.finished:
            break
    assert p.stopped_early and p.epoch == stops_after
    assert (p.best_epoch, p.best_score) == (3, 0.7)
    assert (p.best_loss_epoch, p.best_loss) == (5, 0.39)  # both are kept whatever counts


def test_progress_saved_before_the_loss_was_kept_resumes():
    old = {k: v for k, v in vars(state.Progress(epoch=3, best_score=0.9, best_epoch=2)).items()
           if k not in ("best_loss", "best_loss_epoch")}  # a progress.json written before them
    p = state.after_epoch(state.Progress(**old), 3, 0.8, 0.3, epochs=10, early_stopping=3, select_on="both")
    assert (p.best_epoch, p.best_loss_epoch, p.bad_epochs) == (2, 4, 0)


def test_select_on_is_checked():
    with pytest.raises(ValueError, match="train.select_on='iou' is not valid; allowed values are 'both', 'dice', 'val_loss'"):
        build_config(overrides=["train.select_on=iou"])
    assert build_config().train.select_on == "both"
