"""NIfTI volumes in the prediction pipeline: slices out of the decoders, mask volumes into the sink.

Design choices:

- A volume's slices flow through the cohort pipeline as ordinary items (``loader.Item`` with
  ``slice = (axis, index, count)``): a decoding process reads the volume, brings it to the
  canonical orientation, normalises it with the checkpoint's rule (``mri``: the volume's own
  statistics, ``ct``: the checkpoint's numbers; ``seg.data.volumes``) slice by slice, and
  prepares each slice as the engine prepares an image (channels, resize in resize mode). The
  main process batches them with everything else (or tiles them in tile mode), and the writer
  threads resize each probability map back to the slice's size and threshold it, as for images.
- ``VolumeAssembler`` (one per unit sink) collects the thresholded slices of each volume in a
  canonical boolean array, from whichever writer thread finishes a slice; the thread that adds
  the last slice writes ``{stem}_mask.nii.gz`` through the unit's sink (a file renamed into
  place, or a member of the unit's tar) and returns the volume's manifest record. A volume is a
  unit of its own, so the manifest, resume and failures work per volume unchanged.
- QC per volume: each slice is measured as an image (``seg.inference.qc``), and the volume's
  ``qc`` record aggregates them when the last slice is in (``volume_qc``): the slices that hold
  something to judge (a predicted mask, or an empty one on non-blank intensities) decide it.
- The mask file is written in the INPUT's storage order with its affine and header
  (``seg.data.volumes.mask_volume_bytes``): the header is read again here (header only), so no
  geometry travels between processes.
- A checkpoint trained on 2D images is refused for volumes and one trained on volume slices
  for 2D images (``check_volume_inputs``): their intensities are scaled differently, and
  predicting anyway would give silently wrong masks.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from seg.data import volumes as V
from seg.inference.qc import FLAGS

MASK_SUFFIX = "_mask.nii.gz"


def volume_slices(path: str, preprocessor) -> Iterator[tuple[tuple[int, int, int], np.ndarray, tuple[int, int]]]:
    """The prepared slices of one volume: ``((axis, index, count), prepared slice, (H, W))``.

    Args:
        path: a ``.nii``/``.nii.gz`` file.
        preprocessor: ``seg.inference.engine.Preprocessor`` of a volume checkpoint
            (``preprocessor.volume`` set).

    Raises:
        VolumeReadError: the volume cannot be read (the caller records a failure).
    """
    settings = preprocessor.volume
    if not settings:
        raise ValueError(f"{path}: the checkpoint was not trained on NIfTI volumes (no preprocess['volume'])")
    vol = V.load_volume(path)
    stats = V.volume_stats(vol.data, settings["normalization"], path)
    axis = V.axis_index(settings["slice_axis"])
    count = V.slice_count(vol.data.shape, axis)
    for k in range(count):
        image = V.normalize(V.get_slice(vol.data, axis, k), stats)
        yield (axis, k, count), preprocessor.prepare(image), tuple(image.shape)


class VolumeAssembler:
    """Thresholded slices in, one mask volume per input out (thread-safe; see module docstring)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: dict[str, dict] = {}

    def add(self, sink, source: str, rel: str, where: tuple[int, int, int], mask: np.ndarray,
            qc: dict | None = None) -> dict | None:
        """Add slice ``where = (axis, index, count)`` of ``source``; the volume's manifest record
        (``input``, ``output``, ``foreground``, ``slices``, and ``qc`` when the slices have QC
        records) once its last slice is in, else None.

        Shape:
            mask: ``(H, W)`` bool, the slice at the volume's size.
        """
        axis, index, count = (int(v) for v in where)
        with self.lock:
            entry = self.pending.get(source)
            if entry is None:
                geometry = V.VolumeGeometry.read(source)
                entry = {"geometry": geometry, "mask": np.zeros(geometry.shape, bool), "seen": set(), "qc": []}
                self.pending[source] = entry
            cut = [slice(None)] * 3
            cut[axis] = index
            entry["mask"][tuple(cut)] = mask
            entry["seen"].add(index)
            if qc is not None:
                entry["qc"].append(qc)
            if len(entry["seen"]) < count:
                return None
            del self.pending[source]
        volume = entry["mask"]
        sink.write(rel + MASK_SUFFIX, V.mask_volume_bytes(volume, entry["geometry"]))
        record = {"input": source, "output": rel + MASK_SUFFIX, "foreground": round(float(volume.mean()), 6),
                  "slices": count}
        if entry["qc"]:
            record["qc"] = volume_qc(entry["qc"], record["foreground"])
        return record


VOLUME_FLAG_SHARE = 0.05  # a slice flag counts for the volume when it fires on this share of judged slices


def volume_qc(slices: list[dict], foreground: float) -> dict:
    """A volume's QC record from its slices' records (``seg.inference.qc``), same keys.

    The judged slices are those with a predicted mask or an empty mask on non-blank intensities
    (``empty_on_content``); blank, correctly empty slices say nothing about the volume. Over
    them: ``score`` and ``entropy`` are means, ``flip_dice`` the mean where TTA ran, ``content``
    the largest; a flag is the volume's when it fired on at least ``VOLUME_FLAG_SHARE`` of them.
    ``empty_on_content`` is the volume's own: an empty mask volume on non-blank intensities.
    The training quantiles and component counts are slice measures and stay per slice
    (``None`` here); ``slices_judged`` and ``slices_flagged`` count slices.
    """
    judged = [q for q in slices if q["foreground"] > 0 or q["empty_on_content"]] or slices
    mean = lambda values: round(float(np.mean(values)), 4) if values else None  # noqa: E731
    flip = [q["flip_dice"] for q in judged if q["flip_dice"] is not None]
    contents = [q["content"] for q in slices if q["content"] is not None]
    empty_on_content = foreground == 0 and any(q["empty_on_content"] for q in slices)
    counts = {name: sum(name in q["flags"] for q in judged) for name in FLAGS}
    flags = [name for name in FLAGS if counts[name] >= max(1, VOLUME_FLAG_SHARE * len(judged))
             and name != "empty_on_content"] + (["empty_on_content"] if empty_on_content else [])
    return {"score": mean([q["score"] for q in judged]), "flags": sorted(flags, key=FLAGS.index),
            "entropy": mean([q["entropy"] for q in judged]), "flip_dice": mean(flip), "foreground": foreground,
            "foreground_quantile": None, "components": None, "components_quantile": None,
            "content": max(contents) if contents else None, "empty_on_content": empty_on_content,
            "touches_border": any(q["touches_border"] for q in judged),
            "slices_judged": len(judged), "slices_flagged": sum(1 for q in judged if q["flags"])}


def output_names(output: str, suffixes: list[str]) -> list[str]:
    """The files of one manifest record: a mask volume alone, or an image's ``_mask.png`` and
    its by-products (``suffixes`` replace ``_mask.png``)."""
    if output.endswith(MASK_SUFFIX):
        return [output]
    return [output[: -len("_mask.png")] + s for s in suffixes]


def check_volume_inputs(units, preprocess: dict, overlay: bool = False, probability: bool = False) -> None:
    """Refuse volumes with a 2D checkpoint, 2D images with a volume checkpoint, and the 2D-only
    outputs (overlay, probability map) for volumes.

    Raises:
        ValueError: naming an input and the fix.
    """
    sources = [s for u in units if u.kind == "files" for s in u.sources]
    volume = next((s for s in sources if V.is_volume_name(s)), None)
    image = next((s for s in sources if not V.is_volume_name(s)), None)
    trained_on_volumes = bool(preprocess.get("volume"))
    if volume is not None and not trained_on_volumes:
        raise ValueError(f"{volume} is a NIfTI volume but the checkpoint was trained on 2D images (its preprocess has "
                         "no 'volume' entry); train on shards from `seg prepare` on the volumes to predict volumes")
    if image is not None and trained_on_volumes:
        raise ValueError(f"{image} is a 2D image but the checkpoint was trained on NIfTI volume slices normalised per "
                         "volume; predict .nii/.nii.gz volumes with it, or use a checkpoint trained on 2D images")
    if volume is not None and (overlay or probability):
        raise ValueError("--save_overlay and --save_probability write 2D images; for NIfTI volumes seg predict "
                         f"writes {{stem}}{MASK_SUFFIX} only: leave them out")
