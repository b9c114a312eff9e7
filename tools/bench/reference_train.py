"""The reference: a minimal training script in the style of Pytorch-UNet's ``train.py``.

What the widely used recipe does, kept: images and masks read from folders into a Dataset,
a DataLoader (batch 4, shuffle, ``num_workers=os.cpu_count()``, pinned memory), RMSprop
(weight decay 1e-8, momentum 0.999), BCEWithLogits + soft Dice, fp32, contiguous memory,
gradient clipping at 1.0, one validation pass (Dice) per epoch, a ``checkpoint_epochN.pth``
state dict per epoch. The same U-Net (``seg.model.UNet``) so that only the recipe differs.
Used by ``train_bench.py`` as the whole-process baseline for ``seg train``, and by
``accuracy_bench.py`` as the accuracy baseline: for that it also takes the network width, a
seed, the resize interpolation (``linear`` is what ``seg predict`` does, so the saved model is
predicted with the preprocessing it was trained with), and writes ``history.csv`` (epoch,
pooled and per-image validation Dice) and ``best_model.pth``: the epoch with the best pooled
validation Dice as a ``seg`` model checkpoint (``mean`` 0, ``std`` 1: the recipe only divides by
255), which ``seg predict`` and ``seg evaluate`` load. Saving is outside the timed steps.

    python tools/bench/reference_train.py --images DIR --masks DIR --val_list FILE --out DIR \\
        [--epochs 1 --batch_size 4 --size 256 --width 64 --seed 0 --interpolation cubic]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from seg.model import UNet  # noqa: E402


class FolderDataset(Dataset):
    def __init__(self, images: Path, masks: Path, names: list[str], size: int, interpolation: int = cv2.INTER_CUBIC):
        self.images, self.masks, self.names, self.size = images, masks, names, size
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        name = self.names[i]
        img = cv2.cvtColor(cv2.imread(str(self.images / f"{name}.png")), cv2.COLOR_BGR2RGB)
        mask = cv2.imread(str(self.masks / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE)
        img = cv2.resize(img, (self.size, self.size), interpolation=self.interpolation)
        mask = cv2.resize(mask, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255.0)
        y = torch.from_numpy((mask > 0).astype(np.float32))[None]
        return x, y


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(-1, -2))
    sets = prob.sum(dim=(-1, -2)) + target.sum(dim=(-1, -2))
    return 1.0 - ((2 * inter + eps) / (sets + eps)).mean()


def reference_step(model, optimizer, images, masks) -> torch.Tensor:
    """One step of the reference recipe (fp32, contiguous, no autocast)."""
    logits = model(images)
    loss = F.binary_cross_entropy_with_logits(logits, masks) + dice_loss(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def reference_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(model.parameters(), lr=1e-5, weight_decay=1e-8, momentum=0.999, foreach=True)


@torch.no_grad()
def evaluate(model, loader) -> float:
    return evaluate_both(model, loader)[0]


@torch.no_grad()
def evaluate_both(model, loader) -> tuple[float, float]:
    """(the recipe's score: mean over batches of the per-image Dice, pooled Dice of all pixels)."""
    model.eval()
    scores, inter_sum, sets_sum = [], 0.0, 0.0
    for x, y in loader:
        pred = (torch.sigmoid(model(x)) > 0.5).float()
        inter = (pred * y).sum(dim=(1, 2, 3))
        sets = pred.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3))
        scores.append(((2 * inter + 1e-6) / (sets + 1e-6)).mean().item())
        inter_sum, sets_sum = inter_sum + float(inter.sum()), sets_sum + float(sets.sum())
    model.train()
    if not scores:
        return float("nan"), float("nan")
    return float(np.mean(scores)), (2 * inter_sum / sets_sum if sets_sum else 1.0)


def save_seg_checkpoint(model, path: Path, size: int, epoch: int, dice: float) -> None:
    """The model as a seg checkpoint (what ``seg predict`` loads), preprocessing as trained."""
    from seg.checkpoint import model_checkpoint, save_checkpoint

    preprocess = {"image_size": size, "in_channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3, "sampling": "resize"}
    save_checkpoint(model_checkpoint(model, preprocess, threshold=0.5, epoch=epoch, metrics={"dice": dice}), path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--masks", type=Path, required=True)
    ap.add_argument("--val_list", type=Path, required=True, help="file with one validation image stem per line")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--width", type=int, default=64, help="U-Net base width")
    ap.add_argument("--seed", type=int, default=None, help="seed for weights and data order (default: unseeded)")
    ap.add_argument("--interpolation", choices=("cubic", "linear"), default="cubic",
                    help="image resize (cubic: Pytorch-UNet's; linear: what seg predict does)")
    ap.add_argument("--epoch_checkpoints", action=argparse.BooleanOptionalAction, default=True,
                    help="a checkpoint_epochN.pth state dict per epoch, as Pytorch-UNet writes")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    interp = cv2.INTER_CUBIC if args.interpolation == "cubic" else cv2.INTER_LINEAR
    val = set(args.val_list.read_text().split())
    names = sorted(p.stem for p in args.images.glob("*.png"))
    train_ds = FolderDataset(args.images, args.masks, [n for n in names if n not in val], args.size, interp)
    val_ds = FolderDataset(args.images, args.masks, [n for n in names if n in val], args.size, interp)
    loader_args = dict(batch_size=args.batch_size, num_workers=os.cpu_count(), pin_memory=True)
    train_loader = DataLoader(train_ds, shuffle=True, **loader_args)
    val_loader = DataLoader(val_ds, shuffle=False, drop_last=False, **loader_args)
    model = UNet(3, args.width)
    optimizer = reference_optimizer(model)
    args.out.mkdir(parents=True, exist_ok=True)
    history, best = ["epoch,dice,mean_dice,train_seconds,seconds\n"], -1.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for x, y in train_loader:
            loss = reference_step(model, optimizer, x, y)
            seen += len(x)
        train_s = time.perf_counter() - t0
        dice, pooled = evaluate_both(model, val_loader)
        if args.epoch_checkpoints:
            torch.save(model.state_dict(), args.out / f"checkpoint_epoch{epoch}.pth")
        if pooled > best:
            best = pooled
            save_seg_checkpoint(model, args.out / "best_model.pth", args.size, epoch, pooled)
        history.append(f"{epoch},{pooled:.6g},{dice:.6g},{train_s:.4g},{time.perf_counter() - t0:.4g}\n")
        (args.out / "history.csv").write_text("".join(history))
        print(f"epoch {epoch}: {seen} images, loss {loss.item():.4f}, val dice {dice:.4f}, "
              f"{seen / train_s:.3f} img/s in training steps", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
