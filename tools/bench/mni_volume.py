"""Real-data volume benchmark input: the MNI ICBM152 2009a template and its grey-matter map.

nilearn ships both as package data (``pip install --no-deps nilearn``); they are read here as
files (nilearn itself is never imported: ``importlib.util.find_spec`` only locates it).

One template cannot be split by subject, and its two hemispheres are mirror images (the
``sym`` template is symmetric), so a left/right split would validate on the training data
flipped. The volume is cut instead along the anterior-posterior axis into two halves with a
10 mm gap between them (no neighbouring slices across the split), each written as a volume of
its own with its affine moved accordingly:

    WORK/images/anterior.nii.gz   WORK/labels/anterior_seg.nii.gz    (y >= 121: frontal, temporal poles)
    WORK/images/posterior.nii.gz  WORK/labels/posterior_seg.nii.gz   (y < 111: parietal, occipital, cerebellum)

The label is the grey-matter probability map thresholded at 0.5 (stored as 0-255: > 127).
``seg prepare --val_split 0.2`` puts ``posterior`` in val and ``anterior`` in train (the
split hashes the sample key: 0.061 and 0.845). Usage::

    python tools/bench/mni_volume.py --work /tmp/mni
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np

T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
POSTERIOR_END, ANTERIOR_START = 111, 121  # voxel y (1 mm): a 10 mm gap around the middle (116)


def nilearn_data() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nilearn is not installed: pip install --no-deps nilearn (its data files are used, "
                         "not its code)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def half(img: nib.Nifti1Image, data: np.ndarray, start: int, stop: int) -> nib.Nifti1Image:
    """Voxels ``[:, start:stop, :]`` as a volume with the affine moved to voxel y = start."""
    affine = img.affine.copy()
    affine[:3, 3] = nib.affines.apply_affine(img.affine, [0, start, 0])
    out = nib.Nifti1Image(np.ascontiguousarray(data[:, start:stop, :]), affine, img.header)
    out.set_qform(affine, int(img.header["qform_code"]) or 1)
    out.set_sform(affine, int(img.header["sform_code"]) or 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="output folder (images/ and labels/ are written there)")
    p.add_argument("--data", default=None, help="folder holding the two .nii.gz files (default: nilearn's data)")
    args = p.parse_args()
    data = Path(args.data) if args.data else nilearn_data()
    t1, gm = nib.load(str(data / T1)), nib.load(str(data / GM))
    if nib.aff2axcodes(t1.affine) != ("R", "A", "S") or not np.allclose(t1.affine, gm.affine):
        raise SystemExit(f"{data}: the template and grey-matter map are expected in RAS on one grid")
    image = np.asanyarray(t1.dataobj)
    label = (np.asanyarray(gm.dataobj) > 127).astype(np.uint8)  # probability > 0.5 (stored x255)
    work = Path(args.work)
    for name, (start, stop) in {"posterior": (0, POSTERIOR_END), "anterior": (ANTERIOR_START, image.shape[1])}.items():
        (work / "images").mkdir(parents=True, exist_ok=True)
        (work / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(half(t1, image, start, stop), str(work / "images" / f"{name}.nii.gz"))
        nib.save(half(gm, label, start, stop), str(work / "labels" / f"{name}_seg.nii.gz"))
        part = label[:, start:stop]
        print(f"{name}: {part.shape} voxels, grey matter {part.mean():.3f} of the volume")
    print(f"wrote {work}/images and {work}/labels")


if __name__ == "__main__":
    main()
