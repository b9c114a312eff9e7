"""NIfTI volumes: reading, canonical orientation, slicing, intensity normalisation, mask writing.

Design choices:

- nibabel reads ``.nii`` and ``.nii.gz``. A volume is brought to the closest canonical (RAS+)
  orientation, as ``nibabel.as_closest_canonical`` does (``load_volume`` calls it): array axis
  0 runs left to right, 1 posterior to anterior, 2 inferior to superior, so "axial" means the
  same array axis (2) for every scanner's storage order, and an image and a mask stored in
  different orientations line up. The input's own affine, header and storage order are kept
  (``VolumeGeometry``) so a predicted mask is written back in the INPUT's orientation
  (``mask_volume_bytes``): the same data layout, the same qform/sform (with their codes), so it
  overlays the original in any viewer.
- ``VolumeGeometry.read`` needs only the header (nibabel loads data lazily), so the process that
  writes a mask never reads the image data a second time.
- Intensities keep the dtype nibabel gives for the stored data (int16, uint8, float32, ...);
  a scaled volume (``scl_slope`` != 1) comes back as floating point, as nibabel scales it.
- Normalisation (``normalize``) is one affine map per volume, applied voxel by voxel, so
  normalising a slice equals slicing the normalised volume:
  ``x -> (clip(x, lo, hi) - mean) / std`` in float32. ``mri``: per volume, ``lo``/``hi`` are
  the 0.5/99.5 percentiles of the non-zero voxels, mean/std those of the clipped non-zero
  voxels. ``ct``: one set for the whole data set, from the foreground (label > 0) voxels of the
  training volumes: at most ``CT_SAMPLE_PER_VOLUME`` voxels drawn per volume (all of them when
  fewer; a fixed seed per volume), then the same percentiles, clip and mean/std. Statistics
  are plain dicts (``{"modality", "lo", "hi", "mean", "std", "voxels"}``) stored with every
  slice and in the checkpoint, so prediction applies exactly the training numbers (``mri``:
  the same function on the same voxels).
- Labels are binary: every non-zero voxel must hold one and the same value (0/1, 0/255, ...).
  A label volume with several non-zero values (a multi-label map, or an interpolated mask) and
  an empty one are errors naming the file and the fix; nothing is guessed.
- Errors are ``VolumeReadError`` (an ``ImageReadError``: the same ``kind`` grouping in
  ``seg prepare``'s summary) naming the file and the fix.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np

from seg.data.io import ImageReadError

VOLUME_EXTENSIONS = (".nii.gz", ".nii")
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # array axes of the canonical (RAS+) volume
MODALITIES = ("mri", "ct")
CLIP_PERCENTILES = (0.5, 99.5)
CT_SAMPLE_PER_VOLUME = 50_000
MASK_COMPRESSLEVEL = 1  # nibabel's own default for .nii.gz: masks compress well at level 1 already


class VolumeReadError(ImageReadError):
    """A volume or label volume that cannot be used; the message names the file and the fix.

    ``kind`` adds ``geometry mismatch``, ``non-binary label`` and ``empty label`` to
    ``ImageReadError``'s kinds.
    """


def is_volume_name(name) -> bool:
    """True for ``.nii`` / ``.nii.gz`` names (case-insensitive), hidden files excluded."""
    text = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    return not text.startswith(".") and text.lower().endswith(VOLUME_EXTENSIONS)


def split_volume_name(name: str) -> tuple[str, str]:
    """``"a/x.nii.gz" -> ("a/x", ".nii.gz")``; a name that is not a volume keeps ``("name", "")``."""
    text = str(name)
    for ext in VOLUME_EXTENSIONS:
        if text.lower().endswith(ext):
            return text[: -len(ext)], text[-len(ext):]
    return text, ""


def axis_index(slice_axis: str | int) -> int:
    """Array axis of the canonical volume for ``"axial"``/``"coronal"``/``"sagittal"`` or 0/1/2."""
    if isinstance(slice_axis, str) and slice_axis in SLICE_AXES:
        return SLICE_AXES[slice_axis]
    if str(slice_axis) in ("0", "1", "2"):
        return int(slice_axis)
    raise ValueError(f"slice_axis={slice_axis!r} is not valid; use axial, coronal, sagittal (or 2, 1, 0)")


def axis_name(slice_axis: str | int) -> str:
    index = axis_index(slice_axis)
    return next(name for name, i in SLICE_AXES.items() if i == index)


def _nib():
    import nibabel as nib  # imported on use: commands that never see a volume do not pay for it

    return nib


@dataclass
class VolumeGeometry:
    """Where a volume's voxels are, from its header alone.

    Attributes:
        path: the file.
        header, image_class: the input's header (a copy) and nibabel class (NIfTI-1 or -2).
        original_affine, original_shape: as stored (spatial shape, 3 values).
        ornt: ``nibabel.orientations.io_orientation`` of the input (storage axes -> RAS+).
        affine, shape, spacing: of the canonical volume (spacing in mm per canonical axis).
    """

    path: str
    header: object
    image_class: type
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    ornt: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def from_image(cls, img, path: str) -> "VolumeGeometry":
        nib = _nib()
        shape = _spatial_shape(img.shape, path)
        affine = np.asarray(img.affine, np.float64)
        ornt = nib.orientations.io_orientation(affine)
        if np.isnan(ornt).any():
            raise VolumeReadError(f"{path}: its affine has a zero or degenerate axis ({affine[:3, :3].tolist()}); "
                                  "fix the qform/sform of the header", kind="unsupported")
        canonical = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
        cshape = tuple(int(shape[int(a)]) for a in np.argsort(ornt[:, 0]))
        spacing = tuple(float(s) for s in np.sqrt((canonical[:3, :3] ** 2).sum(0)))
        return cls(str(path), img.header.copy(), type(img), affine, shape, ornt, canonical, cshape, spacing)

    @classmethod
    def read(cls, path) -> "VolumeGeometry":
        """The geometry of a volume file, reading its header only."""
        return cls.from_image(_open(path), str(path))

    def to_canonical(self, data: np.ndarray) -> np.ndarray:
        """Stored layout -> canonical (RAS+) layout (a view where possible)."""
        return _nib().orientations.apply_orientation(data, self.ornt)

    def to_original(self, data: np.ndarray) -> np.ndarray:
        """Canonical layout -> the input's stored layout (inverse of ``to_canonical``)."""
        nib = _nib()
        identity = np.array([[0, 1], [1, 1], [2, 1]], np.float64)
        return nib.orientations.apply_orientation(data, nib.orientations.ornt_transform(identity, self.ornt))

    def slice_spacing(self, slice_axis: str | int) -> list[float]:
        """``[row, column, thickness]`` spacing in mm of a slice cut along ``slice_axis``."""
        axis = axis_index(slice_axis)
        rows, cols = [a for a in range(3) if a != axis]
        return [self.spacing[rows], self.spacing[cols], self.spacing[axis]]


@dataclass
class Volume:
    """A volume in canonical orientation. ``data`` keeps the stored dtype. Shape: ``(X, Y, Z)``."""

    geometry: VolumeGeometry
    data: np.ndarray

    @property
    def path(self) -> str:
        return self.geometry.path


def _open(path):
    nib = _nib()
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise VolumeReadError(f"{path}: file not found (check the path)", kind="unreadable") from None
    except Exception as exc:  # ImageFileError, truncated gzip header, wrong magic, ...
        raise VolumeReadError(f"{path}: cannot be read as NIfTI ({exc}); check that it is a complete .nii or "
                              ".nii.gz file (re-export or copy it again)", kind="unreadable") from None


def _spatial_shape(shape, path) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return shape + (1,)
    if len(shape) < 2 or any(s != 1 for s in shape[3:]):
        raise VolumeReadError(f"{path}: shape {shape} is not a 3D volume (a 4D series has one volume per frame); "
                              "split it into 3D volumes, e.g. with nibabel's image.slicer[..., t]", kind="unsupported")
    return shape[:3]


def load_volume(path) -> Volume:
    """Read a ``.nii``/``.nii.gz`` volume in the closest canonical orientation.

    Raises:
        VolumeReadError: missing, unreadable or truncated file, not 3D, or a non-numeric dtype.
    """
    nib = _nib()
    img = _open(path)
    geometry = VolumeGeometry.from_image(img, str(path))
    try:
        if img.ndim != 3:  # 2D, or 4D with one frame: the 3D view first
            img = img.__class__(np.asanyarray(img.dataobj).reshape(geometry.original_shape), img.affine, img.header)
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj)
    except VolumeReadError:
        raise
    except Exception as exc:  # truncated .nii.gz (EOFError, zlib.error), short .nii (ValueError), ...
        raise VolumeReadError(f"{path}: voxel data cannot be read ({type(exc).__name__}: {exc}); the file is "
                              "truncated or corrupt (re-export or copy it again)", kind="truncated") from None
    if data.dtype.kind not in "biuf":
        raise VolumeReadError(f"{path}: voxel type {data.dtype} is not supported; seg reads scalar integer or float "
                              "volumes (convert RGB or complex data first)", kind="unsupported")
    if not np.allclose(canonical.affine, geometry.affine, atol=1e-6):  # one orientation rule, two code paths
        raise AssertionError(f"{path}: canonical affine differs from nibabel.as_closest_canonical")
    return Volume(geometry, data)


def check_same_geometry(image: VolumeGeometry, mask: VolumeGeometry, atol_mm: float = 1e-3) -> None:
    """Raise ``VolumeReadError`` if a label volume does not cover its image voxel for voxel.

    Both are compared in canonical orientation: a mask stored in another axis order is fine.
    """
    if image.shape != mask.shape:
        raise VolumeReadError(
            f"{mask.path}: shape {mask.shape} differs from its image {image.path} of shape {image.shape} (both in "
            "canonical RAS orientation); label volumes are never resampled: fix or remove the pair",
            kind="size mismatch")
    if not np.allclose(image.affine, mask.affine, atol=atol_mm):
        raise VolumeReadError(
            f"{mask.path}: its affine differs from its image {image.path} by up to "
            f"{np.abs(image.affine - mask.affine).max():.4g} mm, so the label is not aligned with the image; "
            "resample the label onto the image grid (e.g. nilearn.image.resample_to_img with interpolation="
            "'nearest') or fix the header", kind="geometry mismatch")


def label_mask(data: np.ndarray, path: str) -> np.ndarray:
    """A binary label volume as ``bool``: every non-zero voxel must have the same value.

    Raises:
        VolumeReadError: no foreground (``empty label``), or several non-zero values
            (``non-binary label``).
    """
    fg = data != 0
    if not fg.any():
        raise VolumeReadError(f"{path}: label volume has no foreground voxel (all 0); remove the pair, or give "
                              "the right label file", kind="empty label")
    values = data[fg]
    if (values != values[0]).any():
        shown = ", ".join(f"{v:g}" for v in np.unique(values[: 1 << 20])[:6])
        raise VolumeReadError(f"{path}: label volume is not binary (non-zero values {shown}, ...); seg segments one "
                              "structure: keep one label as 0/1 (e.g. (data == LABEL).astype('uint8') in nibabel), "
                              "and use nearest-neighbour interpolation when resampling labels", kind="non-binary label")
    return fg


# ----------------------------------------------------------------------------- slices
def slice_count(shape, slice_axis: str | int) -> int:
    return int(shape[axis_index(slice_axis)])


def get_slice(data: np.ndarray, slice_axis: str | int, index: int) -> np.ndarray:
    """Slice ``index`` along ``slice_axis`` of a canonical volume, contiguous.

    Shape:
        ``(X, Y, Z)`` -> the two other axes in order, e.g. axial: ``(X, Y)``.
    """
    cut = [slice(None)] * data.ndim
    cut[axis_index(slice_axis)] = index
    return np.ascontiguousarray(data[tuple(cut)])  # basic indexing: np.take copied 400x slower here


def stack_slices(slices, slice_axis: str | int) -> np.ndarray:
    """Inverse of ``get_slice`` over all indices. Shape: ``n x (A, B)`` -> canonical ``(X, Y, Z)``."""
    return np.stack(list(slices), axis=axis_index(slice_axis))


# ----------------------------------------------------------------------------- normalisation
def _finish_stats(modality: str, values: np.ndarray) -> dict:
    values = values.astype(np.float64, copy=False)
    lo, hi = (float(v) for v in np.percentile(values, CLIP_PERCENTILES))
    clipped = np.clip(values, lo, hi)
    mean, std = float(clipped.mean()), float(clipped.std())
    return {"modality": modality, "lo": lo, "hi": hi, "mean": mean, "std": std if std > 0 else 1.0,
            "voxels": int(values.size)}


def mri_stats(data: np.ndarray, path: str = "volume") -> dict:
    """Per-volume statistics over the non-zero voxels (see the module docstring)."""
    values = data[data != 0]
    if values.size == 0:
        raise VolumeReadError(f"{path}: every voxel is 0; nothing to normalise (an empty or masked-out volume)",
                              kind="empty")
    return _finish_stats("mri", values)


def ct_foreground_sample(data: np.ndarray, foreground: np.ndarray, key: str) -> np.ndarray:
    """Up to ``CT_SAMPLE_PER_VOLUME`` foreground intensities of one volume (float32, fixed seed per key)."""
    values = data[foreground]
    if values.size > CT_SAMPLE_PER_VOLUME:
        seed = int.from_bytes(key.encode("utf-8")[:8].ljust(8, b"\0"), "little")
        pick = np.random.default_rng(seed).choice(values.size, CT_SAMPLE_PER_VOLUME, replace=False)
        values = values[np.sort(pick)]
    return values.astype(np.float32)


def ct_stats(samples: list[np.ndarray]) -> dict:
    """Data-set statistics from the training volumes' foreground samples (``ct_foreground_sample``)."""
    values = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if values.size == 0:
        raise ValueError("--modality ct needs foreground voxels from labelled training volumes to compute the "
                         "data-set statistics; none were found (is every label volume empty, or every pair in val?)")
    return _finish_stats("ct", values)


def normalize(data: np.ndarray, stats: dict) -> np.ndarray:
    """``(clip(x, lo, hi) - mean) / std`` in float32; any shape (a volume or one slice)."""
    x = np.asarray(data).astype(np.float32)
    np.clip(x, np.float32(stats["lo"]), np.float32(stats["hi"]), out=x)
    x -= np.float32(stats["mean"])
    x /= np.float32(stats["std"])
    return x


def volume_stats(data: np.ndarray, settings: dict, path: str = "volume") -> dict:
    """The statistics to normalise one volume with: its own (``mri``) or the data set's (``ct``).

    Args:
        settings: ``{"modality": "mri"}`` or the ``ct`` statistics dict (dataset.json
            ``normalization``, or the checkpoint's ``preprocess["volume"]["normalization"]``).
    """
    modality = settings.get("modality")
    if modality == "mri":
        return mri_stats(data, path)
    if modality == "ct":
        return {k: settings[k] for k in ("modality", "lo", "hi", "mean", "std", "voxels")}
    raise ValueError(f"volume normalisation {modality!r} is not valid; use one of {', '.join(MODALITIES)}")


# ----------------------------------------------------------------------------- writing masks
def mask_volume_image(mask: np.ndarray, geometry: VolumeGeometry):
    """A nibabel image of a canonical binary mask in the input's storage order, affine and header.

    The header is the input's with the data type set to uint8, no scaling, display range 0-1,
    and the input's qform and sform (with their codes) restored exactly.

    Shape:
        mask: canonical ``geometry.shape`` (any dtype; non-zero is foreground).
    """
    if tuple(mask.shape) != tuple(geometry.shape):
        raise ValueError(f"mask of shape {mask.shape} does not match the volume {geometry.path} "
                         f"(canonical shape {geometry.shape})")
    data = np.ascontiguousarray(geometry.to_original((np.asarray(mask) != 0).astype(np.uint8)))
    header = geometry.header.copy()
    img = geometry.image_class(data, geometry.original_affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    img.header["cal_min"], img.header["cal_max"] = 0, 1
    source = geometry.header
    img.set_qform(source.get_qform(), int(source["qform_code"]))
    img.set_sform(source.get_sform(), int(source["sform_code"]))
    return img


def mask_volume_bytes(mask: np.ndarray, geometry: VolumeGeometry, compressed: bool = True) -> bytes:
    """The bytes of a ``.nii.gz`` (or ``.nii``) mask file (see ``mask_volume_image``).

    gzip with mtime 0: the same mask always gives the same bytes.
    """
    raw = mask_volume_image(mask, geometry).to_bytes()
    return gzip.compress(raw, compresslevel=MASK_COMPRESSLEVEL, mtime=0) if compressed else raw


def write_mask_volume(mask: np.ndarray, geometry: VolumeGeometry, path) -> None:
    """Write a mask volume atomically (``seg.fileio``); ``.nii.gz`` names are gzip-compressed."""
    from seg.fileio import atomic_write_bytes

    atomic_write_bytes(path, mask_volume_bytes(mask, geometry, str(path).lower().endswith(".gz")))
