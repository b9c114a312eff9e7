"""The training loop: build, resume, epochs of steps, validation, checkpoints, preemption.

Design choices:

- The optimizer and lr schedule come from ``seg.training.optim`` (fused Adam/AdamW where
  supported: on CPU the default foreach Adam took up to a quarter of a 256 px step of the 31M
  model; per-step warm-up + decay, or the per-epoch schedules). With ``train.ema_decay`` an
  exponential moving average of the weights (``seg.training.ema``) is updated after each
  optimizer step; validation scores both the average and the raw weights in one pass, and the
  average is what early stopping, ``best_model.pth`` and ``final_model.pth`` use.
- ``train_step`` is the whole per-step work (forward under Accelerate's autocast, loss,
  backward, clipping, optimizer step inside ``accelerator.accumulate``) and is shared with the
  benchmark (``tools/bench/train_bench.py``). It makes no host sync: the loss stays a device
  tensor; the progress bar reads it every ``LOG_EVERY`` steps only.
- The preemption flag is agreed between ranks at every optimizer-step boundary (one tiny
  all-reduce when distributed, a plain read in a single process). On agreement all ranks save
  ``last/`` and return ``PREEMPTED_EXIT_CODE``.
- Epoch end, in an order that keeps the run folder consistent after a crash at any point:
  validation -> lr schedule -> best/periodic/final model checkpoints and plots -> history.csv
  -> ``last/``. A resumed run drops history rows past ``last/``'s epoch, so each epoch appears
  once.
- Mid-epoch resume regenerates the epoch's data stream (a function of seed, epoch, rank,
  worker) and skips the batches already done, so a deterministic run resumed at any step ends
  with the same weights as an uninterrupted one.
- Start-up overlap: the first epoch's training and validation loaders (their worker
  processes) start before the model is built, so data loading, albumentations' import in the
  workers and the first batches run while this process imports and builds; every epoch's
  validation workers prefetch during the training steps.
- Rank 0 writes every shared file; other ranks only join the collectives (gathers, barriers).
  A model checkpoint is serialised once and written once; best/periodic/final files holding
  the same weights are hard links to that file (atomic rename into place);
  the final plots render in a thread while the checkpoints are written.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from seg.checkpoint import model_checkpoint
from seg.config import Config, config_to_dict, config_to_yaml
from seg.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, temporary_name
from seg.losses import build_loss
from seg.model import build_model
from seg.training import data, history, optim, plots, state
from seg.training.ema import ModelEMA
from seg.training.accel import build_accelerator, describe, prepare_model, resolve_mixed_precision, to_device
from seg.training.provenance import PROVENANCE_FILE, collect_provenance
from seg.training.validate import validate_models

LOG_EVERY = 10  # progress-bar loss refresh, in steps (each read is a host sync)
PLOT_SAMPLES = 4


def train_step(accelerator, model, optimizer, loss_fn, images, masks, grad_clip: float) -> torch.Tensor:
    """One micro-batch: forward, loss, backward; optimizer step when the accumulation is complete.

    Shape:
        images ``(B, C, H, W)`` (on the device, NHWC when channels_last), masks ``(B, 1, H, W)``;
        returns the detached scalar loss (no host sync).
    """
    with accelerator.accumulate(model):
        logits = model(images)
        loss = loss_fn(logits, masks)
        accelerator.backward(loss)
        if grad_clip > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int = 1):
    """The lr schedule (``seg.training.optim.build_scheduler``)."""
    return optim.build_scheduler(cfg.train, optimizer, steps_per_epoch)


def build_training(cfg: Config, accelerator):
    """(model, optimizer, loss) prepared by Accelerate: the U-Net (NHWC if set), the optimizer, the loss."""
    m, t = cfg.model, cfg.train
    model = build_model(cfg.data.in_channels, m.base_channels, m.bilinear, m.norm)
    model = prepare_model(accelerator, model, t.channels_last)
    optimizer = optim.build_optimizer(model, t.lr, t.weight_decay, t.optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, build_loss(t.loss, t.bce_weight, t.dice_weight, t.dice_reduction)


def _log(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        tqdm.write(text)


def _check_resumable(run_dir: Path, cfg: Config) -> None:
    """The stored model section must match: last/ weights cannot load into another network."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    stored = (yaml.safe_load(path.read_text()) or {})
    keys = [("model", k) for k in ("base_channels", "bilinear", "norm")] + [("data", "in_channels")]
    defaults = {("model", "norm"): "batch"}  # run folders written before the option existed
    diff = [f"{s}.{k}: {stored.get(s, {}).get(k, defaults.get((s, k)))!r} -> {getattr(getattr(cfg, s), k)!r}"
            for s, k in keys if stored.get(s, {}).get(k, defaults.get((s, k))) != getattr(getattr(cfg, s), k)]
    if diff:
        raise ValueError(f"{run_dir}/last/ was trained with another network ({'; '.join(diff)}); pass --no_resume "
                         f"to start over in {run_dir}, or use another --checkpoint_dir")


class _Epoch:
    """Running sums of one epoch on this rank (loss stays on the device)."""

    def __init__(self, device, progress: state.Progress):
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float32) + progress.loss_sum
        self.count = progress.loss_count
        self.start = time.perf_counter() - progress.seconds
        self.data_seconds = progress.data_seconds

    def mean_loss_all_ranks(self, accelerator) -> float:
        total = accelerator.reduce(self.loss_sum.clone(), reduction="mean") if accelerator.num_processes > 1 else self.loss_sum
        return float(total) / max(1, self.count)

    def saved(self, accelerator, progress: state.Progress, step: int) -> state.Progress:
        total = accelerator.reduce(self.loss_sum.clone(), reduction="mean") if accelerator.num_processes > 1 else self.loss_sum
        return replace(progress, step=step, loss_sum=float(total), loss_count=self.count,
                       seconds=time.perf_counter() - self.start, data_seconds=self.data_seconds)


def run_training(cfg: Config, argv: list[str] | None = None) -> int:
    """Train as configured; returns 0, or ``state.PREEMPTED_EXIT_CODE`` after a preemption save."""
    t = cfg.train
    run_dir = Path(t.checkpoint_dir)
    accelerator = build_accelerator(cfg, project_dir=str(run_dir))
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    spec = data.DataSpec(cfg)
    data.check_shards(spec, world, cfg.data.num_workers)
    steps = data.steps_per_epoch(spec.n_train, t.batch_size, world, t.grad_accum, t.max_steps_per_epoch)
    micro = steps * t.grad_accum
    last_size = data.last_batch_size(spec.n_train, t.batch_size, world, t.grad_accum, steps)
    epoch_images = ((micro - 1) * t.batch_size + last_size) * world
    last = state.find_last(run_dir) if t.resume else None
    # The first epoch's loaders start now: their workers import albumentations, decode and
    # augment while this process builds the model (they use no global RNG: seeded generators).
    before = state.read_progress(last) if last is not None else state.Progress()
    done = before.finished and (before.epoch >= t.epochs or before.stopped_early)
    loaders = None if done or before.epoch >= t.epochs else _start_loaders(cfg, spec, before.epoch, rank, world)
    model, optimizer, loss_fn = build_training(cfg, accelerator)
    scheduler = build_scheduler(cfg, optimizer.optimizer, steps)
    ema = ModelEMA(accelerator.unwrap_model(model), t.ema_decay) if t.ema_decay > 0 else None

    progress = state.Progress()
    if last is not None:
        _check_resumable(run_dir, cfg)
        progress = state.load_last(last, accelerator, model, optimizer, scheduler, ema=ema)
        if progress.finished and (progress.epoch >= t.epochs or progress.stopped_early):
            _log(accelerator, f"{run_dir} has finished ({progress.epoch} epochs{', stopped early' if progress.stopped_early else ''}); "
                              f"nothing to do. Pass --no_resume to train again from scratch, or raise --epochs.")
            return 0
        progress = replace(progress, finished=False, preempted=False)
        _log(accelerator, f"resuming {last} at epoch {progress.epoch + 1}, step {progress.step}/{micro}")

    precision = resolve_mixed_precision(t.mixed_precision)
    provenance = collect_provenance(spec.data_dir, world, t.seed, precision, argv)
    rows: list[dict] = []
    if main:
        state.clean_run_dir(run_dir)
        if not t.resume:  # starting over: an old last/ must not be resumed by a later rerun
            state.remove_last(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        atomic_write_json(run_dir / PROVENANCE_FILE, provenance)
        rows = history.read_history(run_dir, before_epoch=progress.epoch) if last is not None else []
        tqdm.write(f"seg train: {describe(accelerator)}\n{config_to_yaml(cfg)}"
                   f"{spec.n_train} training / {spec.n_val} validation images, {steps} steps of "
                   f"{t.batch_size}x{world}x{t.grad_accum} images per epoch"
                   f"{f' (last batch {last_size}x{world})' if last_size < t.batch_size else ''}")
    if accelerator.log_with:
        accelerator.init_trackers(run_dir.name, config={f"{s}.{k}": v for s, sec in config_to_dict(cfg).items()
                                                        for k, v in sec.items()})
    ckpt_args = dict(preprocess=spec.preprocess, threshold=t.threshold, config=config_to_dict(cfg),
                     provenance=provenance)
    flag = state.PreemptionFlag().install()
    try:
        for epoch in range(progress.epoch, t.epochs):
            running = _Epoch(accelerator.device, progress)
            model.train()
            loader, val_batches = loaders if loaders is not None else _start_loaders(cfg, spec, epoch, rank, world)
            loaders = None
            for _ in range(progress.step):  # resume mid-epoch: regenerate and skip what was done
                next(loader)
            bar = tqdm(total=micro, initial=progress.step, desc=f"epoch {epoch + 1}/{t.epochs}",
                       unit="batch", disable=not main, leave=False, dynamic_ncols=True)
            for i in range(progress.step, micro):
                waited = time.perf_counter()
                images, masks, _ = next(loader)
                if i == micro - 1 and last_size < len(images):  # the remainder of the training set
                    images, masks = images[:last_size], masks[:last_size]
                running.data_seconds += time.perf_counter() - waited
                images = to_device(images, accelerator.device, t.channels_last)
                masks = to_device(masks, accelerator.device, t.channels_last)
                running.loss_sum += train_step(accelerator, model, optimizer, loss_fn, images, masks, t.grad_clip)
                running.count += 1
                if accelerator.sync_gradients:  # an optimizer step was taken
                    if optim.step_per_batch(scheduler):
                        scheduler.step()
                    if ema is not None:
                        ema.update(accelerator.unwrap_model(model))
                bar.update(1)
                if main and (i + 1) % LOG_EVERY == 0:
                    elapsed = time.perf_counter() - running.start
                    bar.set_postfix(loss=f"{float(running.loss_sum) / running.count:.4f}",
                                    img_s=f"{running.count * t.batch_size * world / max(elapsed, 1e-9):.2f}")
                if (i + 1) % t.grad_accum == 0 and i + 1 < micro and flag.agreed(accelerator):
                    bar.close()
                    saved = replace(running.saved(accelerator, progress, i + 1), epoch=epoch, preempted=True)
                    state.save_last(run_dir, accelerator, model, optimizer, scheduler, saved, ema=ema)
                    _log(accelerator, f"preempted (signal {flag.signum}) at epoch {epoch + 1} step {i + 1}/{micro}: "
                                      f"state saved in {run_dir / state.LAST}; exiting with {state.PREEMPTED_EXIT_CODE}")
                    return state.PREEMPTED_EXIT_CODE
            bar.close()
            train_seconds = time.perf_counter() - running.start
            if ema is not None and t.ema_bn_batches > 0:  # after the steps: the epoch's stream goes on
                _recalibrate(ema, loader, t, accelerator)
            del loader
            train_loss = running.mean_loss_all_ranks(accelerator)
            progress = _end_epoch(cfg, accelerator, model, loss_fn, val_batches, spec, scheduler, optimizer, epoch,
                                  progress, train_loss, train_seconds, epoch_images, rows, running,
                                  ckpt_args, ema)
            del val_batches
            if flag.agreed(accelerator) and not progress.finished:
                if accelerator.is_main_process:
                    state.mark_preempted(run_dir, progress)
                _log(accelerator, f"preempted (signal {flag.signum}) after epoch {epoch + 1}: state saved; "
                                  f"exiting with {state.PREEMPTED_EXIT_CODE}")
                return state.PREEMPTED_EXIT_CODE
            if progress.finished:
                break
    finally:
        flag.restore()
        if accelerator.log_with:
            accelerator.end_training()
    return 0


def _recalibrate(ema: ModelEMA, loader, t, accelerator) -> None:
    """The weight average's BatchNorm statistics from the next ``t.ema_bn_batches`` training batches."""
    if not ema.has_batchnorm():
        return

    def forward(module, images):
        with accelerator.autocast():
            module(images)

    batches = (to_device(next(loader)[0], accelerator.device, t.channels_last) for _ in range(t.ema_bn_batches))
    ema.recalibrate_batchnorm(batches, forward, accelerator)


def _start_loaders(cfg: Config, spec, epoch: int, rank: int, world: int):
    """(train, validation) batch iterators of one epoch, their workers started now.

    The validation workers read and transform their first batches during the training steps
    (validation data does not depend on the model) and wait, so validation starts at once.
    """
    return (iter(data.train_loader(cfg, spec, epoch, rank, world)),
            iter(data.val_loader(cfg, spec, rank, world)))


def _end_epoch(cfg, accelerator, model, loss_fn, val_batches, spec, scheduler, optimizer, epoch, progress,
               train_loss, train_seconds, images, rows, running, ckpt_args, ema=None) -> state.Progress:
    """Validate (``val_batches``: this rank's share), schedule, checkpoint, plot, log, then save
    ``last/`` (all ranks). With ``ema`` the averaged weights are validated and saved, the raw
    ones validated too."""
    t = cfg.train
    run_dir = Path(t.checkpoint_dir)
    kept = ema.module if ema is not None else model  # the weights that are selected and saved
    scored = validate_models([kept] + ([model] if ema is not None else []), val_batches, loss_fn, accelerator,
                             t.threshold, t.channels_last, expected=spec.n_val, keep_samples=PLOT_SAMPLES)
    report, val_loss, samples = scored[0]
    dice = report["global"]["dice"]
    lr = optimizer.param_groups[0]["lr"]
    optim.step_epoch(scheduler, dice)
    improved = dice > progress.best_score
    best_score = dice if improved else progress.best_score
    bad = 0 if improved else progress.bad_epochs + 1
    stopped_early = t.early_stopping > 0 and bad >= t.early_stopping
    finished = stopped_early or epoch + 1 >= t.epochs
    seconds = time.perf_counter() - running.start
    row = history.epoch_row(epoch + 1, train_loss, val_loss, report, lr, seconds, images, train_seconds,
                            running.data_seconds, raw_report=scored[1][:2] if ema is not None else None)
    plotting = None
    if accelerator.is_main_process:
        if finished:  # rendered while the checkpoints are written
            plotting = plots.plot_all_in_background([*rows, row], samples, spec.mean, spec.std, t.threshold, run_dir)
        metrics = {**{m: report["global"][m] for m in report["global"]}, "val_loss": val_loss}
        ckpt = _serialize(model_checkpoint(accelerator.unwrap_model(kept), epoch=epoch + 1, metrics=metrics, **ckpt_args))
        names = (["best_model.pth"] if improved else []) + (
            [f"checkpoint_epoch_{epoch + 1}.pth"] if t.save_every and (epoch + 1) % t.save_every == 0 else []) + (
            ["final_model.pth"] if finished else [])
        _write_checkpoint_files(run_dir, names, ckpt)
        rows.append(row)
        history.write_history(run_dir, rows)
        tqdm.write(history.summary_line(row, t.epochs, improved))
        if stopped_early:
            tqdm.write(f"early stopping: no val Dice improvement for {bad} epochs (best {best_score:.4f})")
        if finished:
            for warning in history.stability_warnings(rows, t.epochs, t.warmup_epochs):
                tqdm.write(warning)
    if accelerator.log_with:
        accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
    new = state.Progress(epoch=epoch + 1, step=0, best_score=best_score,
                         best_epoch=epoch + 1 if improved else progress.best_epoch, bad_epochs=bad,
                         finished=finished, stopped_early=stopped_early)
    state.save_last(run_dir, accelerator, model, optimizer, scheduler, new, ema=ema)
    if plotting is not None:
        plotting.join()
    return new


def _write_checkpoint_files(run_dir: Path, names: list[str], ckpt: bytes) -> None:
    """Write the same checkpoint bytes under several names: the first file is written (and
    fsynced) once, the others are hard links to it, each put in place by an atomic rename.

    A later atomic replace of one name (the next best model) leaves the others untouched.
    Where hard links are not supported the bytes are written again.
    """
    if not names:
        return
    first = run_dir / names[0]
    atomic_write_bytes(first, ckpt)
    for name in names[1:]:
        tmp = temporary_name(run_dir / name)
        try:
            os.link(first, tmp)
            os.replace(tmp, run_dir / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            atomic_write_bytes(run_dir / name, ckpt)


def _serialize(ckpt: dict) -> bytes:
    """A model checkpoint as bytes, serialised once for every file it is written to."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()
