"""The training loop: a ``Trainer`` built once, whose ``train()`` reads top to bottom.

Design choices:

- ``Trainer.__init__`` builds everything (Accelerator, checked data, model, optimizer, schedule)
  and resumes from ``last/``; ``train()`` is the loop: epochs of steps, then validation and the
  epoch's files. Collaborators keep their own concern: ``loaders`` (data), ``validate`` (exact
  metrics), ``checkpoints.RunFolder`` (run-folder files), ``state`` (``last/``, preemption),
  ``history`` (rows and log lines).
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
- Mid-epoch resume regenerates the epoch's data stream (a function of seed, epoch, rank, worker)
  and skips the batches done: a deterministic run resumed at any step ends with the same weights.
- Start-up overlap: the first epoch's training and validation loaders (their worker processes)
  start before the model is built, so data loading, albumentations' import in the workers and
  the first batches run while this process imports and builds; every epoch's validation workers
  prefetch during the training steps. Once the model is built, this process imports
  albumentations (``loaders.preload_for_workers``): the workers forked later inherit it.
- After the last epoch (the run already marked finished in ``last/``), ``seg.training.tuning``
  chooses ``best_model.pth``'s threshold and post-processing on the validation set.
- Rank 0 writes every shared file; other ranks only join the collectives (gathers, barriers).
- An error found once the epochs run (a shard broken mid-epoch) exits 1 (``loaders.run_failed``).

The default recipe, and why (``seg.config.training``; measured by
``tools/bench/accuracy_bench.py`` on real images: MNI152 grey / white matter, trained on lower
axial slices and tested on upper ones where the structures shrink, and stardist nuclei tiles;
U-Net width 32 at 128 px, 480 CPU s per run; docs/BENCHMARKS.md has every run and command):

- Adam at 3e-4 (``train.lr``) with the plateau schedule and BatchNorm. At 1e-3 (the default
  before) the raw weights' validation Dice jumped between epochs on every task (white matter,
  epochs 7-11: 0.85, 0.28, 0.65, 0.89, 0.46), the plateau schedule seldom lowered the rate (the
  averaged curve kept creeping up), and runs peaked and stopped early: nuclei peaked at epoch 12,
  stopped at 27 of 62 with per-image test Dice 0.887 (largest validation drop 0.068); at 3e-4
  the same run trained all 62 epochs and scored 0.923 (drop 0.014). The cost is speed: grey
  matter was still improving after its 34 epochs.
- A weight average (``train.ema_decay`` 0.999, ``seg.training.ema``) is validated, selected and
  saved. The raw weights' validation Dice swung by 0.2-0.7 between epochs on every task (old
  defaults: largest drop after the first 20 % of epochs 0.198 gm, 0.679 wm, 0.646 nuclei); the
  average's stayed within 0.010-0.068 at the same epochs.
- Per-image soft Dice (``train.dice_reduction`` image): small structures weigh like large ones.
  On white matter it lifted the per-image mean 0.795 -> 0.812 and halved the empty test
  predictions of slices with foreground (2 -> 1).
- Strong augmentation is strong geometry (scale 0.7-1.4, rotation 30 degrees) with the standard
  intensity steps. Its first version (the same geometry plus gamma, brightness/contrast 0.3 and
  blur) gave the upper white-matter slices no empty prediction (per-image mean 0.822 -> 0.837,
  grey matter 0.808 -> 0.819, at lr 1e-3, against standard augmentation); without those
  intensity steps the nuclei tiles scored 0.9265 instead of 0.9227 (lr 3e-4, same seed).
- Kept: batch 8 and BatchNorm. Batch 4 (twice the steps for the same compute) made BatchNorm's
  batch statistics noisy enough that nuclei validation swung 0.2-0.82 and the run stopped at
  epoch 17 with test Dice 0.80. GroupNorm + cosine decay lost 0.05-0.08 per-image Dice on grey
  and white matter at the same budget, and warm-up + cosine with BatchNorm 0.06 on grey matter:
  short runs are still learning when the decay takes the rate.
- Cost per epoch: the average validates two models and recomputes its BatchNorm statistics from
  ``train.ema_bn_batches`` training batches. In 3-epoch calibrations on a quiet machine this
  still left ``seg train`` (bf16 on the CPU's AMX) at half the reference recipe's CPU seconds
  per epoch (nuclei 7.6 against 14.5, grey matter 13.6 against 28.5).
- The threshold and post-processing of ``best_model.pth`` are chosen on the validation images at
  the end of training (``train.tune_postprocessing``, ``seg.training.tuning``). The models ran
  over-confident on the thin grey-matter ribbon: at 0.5 grey matter scored 0.784 (3 seeds)
  against the reference's 0.820; the choice is 0.7 on all three runs and gives 0.843.
- ``best_model.pth`` is chosen at the end between two epochs (``train.select_on`` both): the
  highest validation Dice and the lowest validation loss, by per-image mean Dice on the
  validation images at full size after each one's threshold choice (``seg.training.tuning``).
  The training loop's Dice at 0.5 levels off within a few epochs (white matter: 0.905-0.914
  from epoch 9 to 39), so its best epoch is picked by noise, while the loss keeps falling. On
  the Dice epoch alone white matter scored 0.829 with one empty mask (a 50-pixel top slice); on
  the loss epoch alone 0.844 with none, but grey matter fell from 0.843 to 0.829 (one seed
  0.815, below the reference) and one nuclei seed from 0.935 to 0.933. The full-size choice took
  the loss epoch on all three white-matter runs and the Dice epoch on grey matter and nuclei:
  the better test score on all nine runs. Cost: a second prediction pass over the validation
  images when the two epochs differ.
- Where it stands (per-image mean Dice on the upper, off-distribution slices and held-out
  tiles, 3 seeds, against the reference recipe at the same calibrated budget, as ``seg train``
  then ``seg predict`` give it): grey matter 0.843 (0.830-0.859) against 0.820; white matter
  0.844 (0.838-0.857) against 0.735; nuclei 0.937 (0.935-0.940) against 0.930. Largest
  validation drop after the first 20 % of epochs 0.009-0.030 (the reference: 0.105-0.558). No
  empty mask on a test image with foreground.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from seg.config import Config, config_to_dict
from seg.config.training import ModelConfig
from seg.data.qc_reference import reference_from
from seg.losses import build_loss
from seg.model import build_model
from seg.progress import progress_bar, write_line
from seg.training import history, loaders, optim, state, tuning
from seg.training.accel import build_accelerator, describe, prepare_model, resolve_mixed_precision, to_device
from seg.training.checkpoints import RunFolder, checkpoint_names
from seg.training.provenance import collect_provenance
from seg.training.ema import ModelEMA
from seg.training.validate import validate_models

LOG_EVERY = 10  # progress-bar loss refresh, in steps (each read is a host sync)
PLOT_SAMPLES = 4
SELECTED = {"dice": "higher val Dice", "val_loss": "lower val loss",  # train.select_on, as the log names it
            "both": "higher val Dice or lower val loss"}


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


def check_resumable(run_dir: Path, cfg: Config) -> None:
    """The stored network must match: ``last/`` weights cannot load into another network."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    stored = yaml.safe_load(path.read_text()) or {}
    keys = [("model", k) for k in ModelConfig.__dataclass_fields__] + [("data", "in_channels")]
    defaults = {("model", "norm"): "batch"}  # run folders written before the option existed
    diff = [f"{s}.{k}: {stored.get(s, {}).get(k, defaults.get((s, k)))!r} -> {getattr(getattr(cfg, s), k)!r}"
            for s, k in keys if stored.get(s, {}).get(k, defaults.get((s, k))) != getattr(getattr(cfg, s), k)]
    if diff:
        raise ValueError(f"{run_dir}/last/ was trained with another network ({'; '.join(diff)}); pass --no_resume "
                         f"to start over in {run_dir}, or use another --checkpoint_dir")


class RunningEpoch:
    """Running sums of one epoch on this rank (the loss stays on the device)."""

    def __init__(self, device, progress: state.Progress):
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float32) + progress.loss_sum
        self.count, self.skipped = progress.loss_count, progress.skipped
        self.start = time.perf_counter() - progress.seconds
        self.data_seconds = progress.data_seconds

    def totals(self, accelerator) -> tuple[float, int]:
        """(mean loss per micro-batch, skipped samples), over all ranks: one all-reduce."""
        sums = torch.stack([self.loss_sum.float(), torch.tensor(float(self.skipped), device=self.loss_sum.device)])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
            sums[0] /= accelerator.num_processes
        return float(sums[0]) / max(1, self.count), int(sums[1])

    def progress(self, accelerator, base: state.Progress, epoch: int, step: int) -> state.Progress:
        """``base`` advanced to ``step`` of ``epoch`` with this epoch's sums (for a mid-epoch save)."""
        mean, skipped = self.totals(accelerator)
        return replace(base, epoch=epoch, step=step, loss_sum=mean * self.count, loss_count=self.count,
                       skipped=skipped, seconds=time.perf_counter() - self.start, data_seconds=self.data_seconds)


class Trainer:
    """One training run as configured (see the module docstring)."""

    def __init__(self, cfg: Config, argv: list[str] | None = None):
        t = cfg.train
        self.cfg, self.run_dir = cfg, Path(t.checkpoint_dir)
        self.accelerator = a = build_accelerator(cfg, project_dir=str(self.run_dir))
        self.spec = loaders.DataSpec(cfg)
        loaders.check_shards(self.spec, a.num_processes, cfg.data.num_workers)
        self.plan = loaders.EpochPlan.of(self.spec.n_train, t.batch_size, a.num_processes, t.grad_accum,
                                         t.max_steps_per_epoch)
        last = state.find_last(self.run_dir) if t.resume else None
        self.progress = state.read_progress(last) if last is not None else state.Progress()
        self.done = self.progress.finished and (self.progress.epoch >= t.epochs or self.progress.stopped_early)
        # The first epoch's loaders start now: their workers import albumentations, decode and
        # augment while this process builds the model (they use no global RNG: seeded generators).
        self._next_loaders = None if self.done else self._start_loaders(self.progress.epoch)
        self.model, self.optimizer, self.loss_fn = build_training(cfg, a)
        loaders.preload_for_workers()  # after the first epoch's workers started: they import on their own
        self.scheduler = build_scheduler(cfg, self.optimizer.optimizer, self.plan.steps)
        self.ema = ModelEMA(a.unwrap_model(self.model), t.ema_decay) if t.ema_decay > 0 else None
        self.resumed_from = None
        if last is not None and not self.done:
            check_resumable(self.run_dir, cfg)
            loaded = state.load_last(last, a, self.model, self.optimizer, self.scheduler, ema=self.ema)
            self.progress = replace(loaded, finished=False, preempted=False)
            self.resumed_from = last
        self.provenance = collect_provenance(self.spec.data_dir, a.num_processes, t.seed,
                                             resolve_mixed_precision(t.mixed_precision), argv)
        self.folder = RunFolder(self.run_dir, dict(preprocess=self.spec.preprocess, threshold=t.threshold,
                                                   config=config_to_dict(cfg), provenance=self.provenance,
                                                   qc_reference=reference_from(self.spec.info)))

    def log(self, text: str) -> None:
        if self.accelerator.is_main_process:
            write_line(text)

    def train(self) -> int:
        """Run the remaining epochs; 0 when done, ``state.PREEMPTED_EXIT_CODE`` after a preemption save."""
        t, a = self.cfg.train, self.accelerator
        if self.done:
            p = self.progress
            self.log(f"{self.run_dir} has finished ({p.epoch} epochs{', stopped early' if p.stopped_early else ''}); "
                     "nothing to do. Pass --no_resume to train again from scratch, or raise --epochs.")
            if t.tune_postprocessing and tuning.needs_tuning(self.run_dir):  # a crash came between the two
                tuning.tune_best_model(self.cfg, a, self.run_dir, self.log)
            return 0
        self._start()
        flag = state.PreemptionFlag().install()
        try:
            for epoch in range(self.progress.epoch, t.epochs):
                running, val_batches = self._train_epoch(epoch, flag)
                if running is None:  # preempted mid-epoch: last/ saved
                    return state.PREEMPTED_EXIT_CODE
                self.progress = self._end_epoch(epoch, running, val_batches)
                if self.progress.finished:
                    break
                if flag.agreed(a):
                    if a.is_main_process:
                        state.mark_preempted(self.run_dir, self.progress)
                    self.log(f"preempted (signal {flag.signum}) after epoch {epoch + 1}: state saved; "
                             f"exiting with {state.PREEMPTED_EXIT_CODE}")
                    return state.PREEMPTED_EXIT_CODE
            if self.progress.finished and t.tune_postprocessing:
                tuning.tune_best_model(self.cfg, a, self.run_dir, self.log)
        except (ValueError, FileNotFoundError) as exc:  # found while running: a shard that broke mid-epoch
            raise loaders.run_failed(exc) from exc
        finally:
            flag.restore()
            if a.log_with:
                a.end_training()
        return 0

    def _start(self) -> None:
        """The run folder (rank 0), the start-up log, trackers."""
        cfg, a, p = self.cfg, self.accelerator, self.plan
        t = cfg.train
        if a.is_main_process:
            self.folder.start(cfg, self.provenance, self.progress.epoch if self.resumed_from is not None else None)
            if self.resumed_from is not None:
                write_line(f"resuming {self.resumed_from} at epoch {self.progress.epoch + 1}, "
                           f"step {self.progress.step}/{p.micro}")
            from seg.config import config_to_yaml

            write_line(f"seg train: {describe(a)}\n{config_to_yaml(cfg)}"
                       f"{self.spec.n_train} training / {self.spec.n_val} validation images, {p.steps} steps of "
                       f"{t.batch_size}x{a.num_processes}x{t.grad_accum} images per epoch"
                       f"{f' (last batch {p.last_size}x{a.num_processes})' if p.last_size < t.batch_size else ''}")
        if a.log_with:
            a.init_trackers(self.run_dir.name, config={f"{s}.{k}": v for s, sec in config_to_dict(cfg).items()
                                                       for k, v in sec.items()})

    def _start_loaders(self, epoch: int):
        """(train, validation) batch iterators of one epoch, their workers started now.

        The validation workers read and transform their first batches during the training steps
        (validation data does not depend on the model) and wait, so validation starts at once.
        """
        a = self.accelerator
        return (iter(loaders.train_loader(self.cfg, self.spec, epoch, a.process_index, a.num_processes)),
                iter(loaders.val_loader(self.cfg, self.spec, a.process_index, a.num_processes)))

    def _train_epoch(self, epoch: int, flag: state.PreemptionFlag):
        """The epoch's training steps: (running sums, validation batches), or (None, None) when
        preempted mid-epoch (``last/`` then holds the step reached)."""
        t, a, p = self.cfg.train, self.accelerator, self.plan
        running = RunningEpoch(a.device, self.progress)
        self.model.train()
        loader, val_batches = self._next_loaders or self._start_loaders(epoch)
        self._next_loaders = None
        for _ in range(self.progress.step):  # resume mid-epoch: regenerate and skip what was done
            next(loader)
        bar = progress_bar(total=p.micro, initial=self.progress.step, desc=f"epoch {epoch + 1}/{t.epochs}",
                           unit="batch", disable=not a.is_main_process, leave=False, dynamic_ncols=True)
        for i in range(self.progress.step, p.micro):
            waited = time.perf_counter()
            images, masks, _, skipped = next(loader)
            if i == p.micro - 1 and p.last_size < len(images):  # the remainder of the training set
                images, masks = images[:p.last_size], masks[:p.last_size]
            running.data_seconds += time.perf_counter() - waited
            running.skipped += int(skipped.sum())
            images = to_device(images, a.device, t.channels_last)
            masks = to_device(masks, a.device, t.channels_last)
            running.loss_sum += train_step(a, self.model, self.optimizer, self.loss_fn, images, masks, t.grad_clip)
            running.count += 1
            if a.sync_gradients:  # an optimizer step was taken
                if optim.step_per_batch(self.scheduler):
                    self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(a.unwrap_model(self.model))
            bar.update(1)
            if a.is_main_process and (i + 1) % LOG_EVERY == 0:
                elapsed = time.perf_counter() - running.start
                bar.set_postfix(loss=f"{float(running.loss_sum) / running.count:.4f}",
                                img_s=f"{running.count * t.batch_size * a.num_processes / max(elapsed, 1e-9):.2f}")
            if (i + 1) % t.grad_accum == 0 and i + 1 < p.micro and flag.agreed(a):
                bar.close()
                saved = replace(running.progress(a, self.progress, epoch, i + 1), preempted=True)
                state.save_last(self.run_dir, a, self.model, self.optimizer, self.scheduler, saved, ema=self.ema)
                self.log(f"preempted (signal {flag.signum}) at epoch {epoch + 1} step {i + 1}/{p.micro}: "
                         f"state saved in {self.run_dir / state.LAST}; exiting with {state.PREEMPTED_EXIT_CODE}")
                return None, None
        bar.close()
        if self.ema is not None and t.ema_bn_batches > 0:  # after the steps: the epoch's stream goes on
            self._recalibrate(loader)
        return running, val_batches

    def _recalibrate(self, loader) -> None:
        """The weight average's BatchNorm statistics from the next ``train.ema_bn_batches`` batches."""
        t, a = self.cfg.train, self.accelerator
        if not self.ema.has_batchnorm():
            return

        def forward(module, images):
            with a.autocast():
                module(images)

        batches = (to_device(next(loader)[0], a.device, t.channels_last) for _ in range(t.ema_bn_batches))
        self.ema.recalibrate_batchnorm(batches, forward, a)

    def _end_epoch(self, epoch: int, running: RunningEpoch, val_batches) -> state.Progress:
        """Validate, schedule, write the epoch's files (rank 0), save ``last/`` (all ranks).

        With a weight average, the average is validated, selected and saved; the raw weights are
        validated in the same pass over the batches, for history.csv's raw columns."""
        t, a = self.cfg.train, self.accelerator
        train_seconds = time.perf_counter() - running.start
        train_loss, skipped = running.totals(a)
        kept = self.ema.module if self.ema is not None else self.model
        scored = validate_models([kept] + ([self.model] if self.ema is not None else []), val_batches, self.loss_fn,
                                 a, t.threshold, t.channels_last, expected=self.spec.n_val, keep_samples=PLOT_SAMPLES)
        report, val_loss, samples = scored[0]
        dice, lr = report["global"]["dice"], self.optimizer.param_groups[0]["lr"]
        optim.step_epoch(self.scheduler, dice)
        new = state.after_epoch(self.progress, epoch, dice, val_loss, t.epochs, t.early_stopping, t.select_on)
        higher, lower = new.best_epoch == epoch + 1, new.best_loss_epoch == epoch + 1
        improved = lower if t.select_on == "val_loss" else higher  # best_model.pth
        loss_candidate = lower and t.select_on == "both"
        row = history.epoch_row(epoch + 1, train_loss, val_loss, report, lr, time.perf_counter() - running.start,
                                self.plan.images, train_seconds, running.data_seconds, skipped + report["skipped"],
                                raw_report=scored[1][:2] if self.ema is not None else None)
        if a.is_main_process:
            metrics = {**report["global"], "val_loss": val_loss}
            self.folder.end_epoch(a.unwrap_model(kept), row, epoch + 1, metrics,
                                  checkpoint_names(improved, epoch + 1, t.save_every, new.finished, loss_candidate),
                                  samples, self.spec.mean, self.spec.std, t.threshold, new.finished)
            write_line(history.summary_line(row, t.epochs, improved))
            if new.stopped_early:
                write_line(f"early stopping: no {SELECTED[t.select_on]} for {new.bad_epochs} epochs "
                           f"(val Dice {new.best_score:.4f} at epoch {new.best_epoch}, "
                           f"val loss {new.best_loss:.4f} at epoch {new.best_loss_epoch})")
            if new.finished:
                for warning in history.stability_warnings(self.folder.rows, t.epochs, t.warmup_epochs):
                    write_line(warning)
        if a.log_with:
            a.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        state.save_last(self.run_dir, a, self.model, self.optimizer, self.scheduler, new, ema=self.ema)
        return new


def run_training(cfg: Config, argv: list[str] | None = None) -> int:
    """Train as configured; returns 0, or ``state.PREEMPTED_EXIT_CODE`` after a preemption save."""
    return Trainer(cfg, argv).train()
