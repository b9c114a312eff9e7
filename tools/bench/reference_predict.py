"""The reference prediction method, as in the popular Pytorch-UNet ``predict.py`` (milesial).

One process, one image per forward, fp32, contiguous (NCHW) tensors, PIL decoding and
saving, ``torch.no_grad``, the logits resized to the original size with ``F.interpolate``
(bilinear), then sigmoid > threshold. Only two things differ from that script, so that the
comparison is about the method and not the model: the model is ``seg``'s U-Net loaded from a
``seg`` checkpoint (the same 31M network as Pytorch-UNet's), and the checkpoint's mean/std are
applied (Pytorch-UNet divides by 255 only; the extra subtraction costs nothing measurable).

    python tools/bench/reference_predict.py --model M.pth --input DIR --output DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seg.checkpoint import load_model


def preprocess(pil_img: Image.Image, size: int, mean, std) -> np.ndarray:
    """Pytorch-UNet's BasicDataset.preprocess (BICUBIC resize, HWC -> CHW, /255) + mean/std."""
    if pil_img.size != (size, size):
        pil_img = pil_img.resize((size, size), resample=Image.BICUBIC)
    img = np.asarray(pil_img.convert("RGB"))
    img = img.transpose((2, 0, 1)).astype(np.float64)
    if (img > 1).any():
        img = img / 255.0
    img = (img - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    return img


def predict_img(net, full_img: Image.Image, device, size: int, mean, std, out_threshold: float = 0.5) -> np.ndarray:
    net.eval()
    img = torch.from_numpy(preprocess(full_img, size, mean, std))
    img = img.unsqueeze(0).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        output = net(img).cpu()
        output = F.interpolate(output, (full_img.size[1], full_img.size[0]), mode="bilinear")
        mask = torch.sigmoid(output) > out_threshold
    return mask[0].long().squeeze().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, help="folder of images")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, ckpt = load_model(args.model)
    net.to(device=device)
    pre = ckpt["preprocess"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(args.input).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    start = time.perf_counter()
    for i, filename in enumerate(files):
        img = Image.open(filename)
        mask = predict_img(net, img, device, pre["image_size"], pre["mean"], pre["std"], ckpt.get("threshold", 0.5))
        Image.fromarray((mask * 255).astype(np.uint8)).save(out / f"{filename.stem}_mask.png")
        if i == 0:
            print(f"first image done after {time.perf_counter() - start:.2f} s of the loop", flush=True)
    seconds = time.perf_counter() - start
    print(f"reference: {len(files)} images in {seconds:.1f} s of the loop, {len(files) / seconds:.2f} images/s", flush=True)


if __name__ == "__main__":
    main()
