"""The batch path of seg predict: decoding threads, writer blocks, and the device path run on the CPU.

The CUDA-only parts (pinned copies on a side stream, events) are in tests/test_gpu.py; here the
same functions run on CPU tensors: ``postprocess`` against OpenCV's resize, and a whole cohort
through ``BatchForward(device_post=True)`` against the CPU path.
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from predict_fixtures import make_checkpoint, random_image, write_image
from seg.inference.device import BatchForward, postprocess
from seg.inference.engine import Predictor, Preprocessor
from seg.inference.inputs import build_units, file_units
from seg.inference.loader import BY_VALUE_BYTES, Chunk, Failure, UnitEnd, UnitStream, record_loader
from seg.config.inference import PredictConfig
from seg.inference.runner import CohortRun
from seg.inference.writers import Block, UnitSink, Writers, encode_outputs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", image_size=32)


def _cohort(folder: Path, n: int, sizes=((32, 32), (20, 44), (50, 30))) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        write_image(folder / f"img{i:03d}.png", random_image(h, w, seed=i))
    return folder


@pytest.mark.timeout(60)
def test_decoding_threads_give_each_unit_once_in_order(tmp_path):
    folder = _cohort(tmp_path / "in", 23)
    (folder / "img005.png").write_bytes(b"")  # unreadable: a Failure, the rest goes on
    units = file_units([(str(p), p.stem) for p in sorted(folder.iterdir())], 4)
    stream = UnitStream(units, Preprocessor("resize", 16, 3, [0.5] * 3, [0.25] * 3), chunk=3)
    decoded: dict[int, list[str]] = {}
    failed: dict[int, list[str]] = {}
    ends = {}
    for rec in record_loader(stream, num_workers=3, prefetch=1):
        assert rec.unit not in ends, "a record after its unit's end marker"
        if isinstance(rec, Chunk):
            decoded.setdefault(rec.unit, []).extend(rec.sources)
            assert tuple(rec.x.shape[1:]) == (16, 16, 3)
        elif isinstance(rec, Failure):
            failed.setdefault(rec.unit, []).append(rec.source)
        else:
            assert isinstance(rec, UnitEnd)
            ends[rec.unit] = rec
    assert sorted(ends) == [u.index for u in units]
    for unit in units:  # every input once; decoded images in the unit's order
        assert decoded[unit.index] == [s for s in unit.sources if s not in failed.get(unit.index, [])]
    assert failed == {1: [str(folder / "img005.png")]}
    assert ends[1] == UnitEnd(1, 3, 1)
    assert not [t for t in threading.enumerate() if t.name.startswith("seg-decode")]


@pytest.mark.timeout(60)
def test_decoding_threads_raise_errors_and_stop_when_closed(tmp_path, monkeypatch):
    folder = _cohort(tmp_path / "in", 40)
    units = file_units([(str(p), p.stem) for p in sorted(folder.iterdir())], 2)
    stream = UnitStream(units, Preprocessor("resize", 16, 3, [0.5] * 3, [0.25] * 3), chunk=1)
    records = record_loader(stream, num_workers=2, prefetch=1)
    next(records)
    records.close()  # consumer gone (an error in the runner): threads end, none left blocked
    assert not [t for t in threading.enumerate() if t.name.startswith("seg-decode")]

    def broken(self, image):
        raise RuntimeError("a bug in preprocessing")

    monkeypatch.setattr(Preprocessor, "prepare", broken)
    with pytest.raises(RuntimeError, match="a bug in preprocessing"):
        list(record_loader(stream, num_workers=2))


def test_small_chunks_travel_by_value_large_ones_in_shared_memory():
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory reductions

    small = Chunk(0, ("a",), ("a",), torch.arange(48, dtype=torch.uint8).view(1, 4, 4, 3), ((4, 4),), (None,))
    data = bytes(ForkingPickler.dumps(small))
    assert len(data) > 48 and pickle.loads(data).x.equal(small.x)
    side = int((BY_VALUE_BYTES // 3) ** 0.5) + 1
    large = Chunk(0, ("a",), ("a",), torch.zeros(1, side, side, 3, dtype=torch.uint8), ((side, side),), (None,))
    assert len(ForkingPickler.dumps(large)) < 4096  # a shared-memory handle, not the pixels


def test_block_writes_the_same_files_as_the_single_image_path(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random((5, 16, 16)).astype(np.float32)
    sizes = [(16, 16)] * 3 + [(9, 30), (40, 12)]
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    names = [f"x{i}" for i in range(5)]
    writers = Writers(0.5, overlay=True, probability=True, threads=2)
    same = writers.submit_block(UnitSink(tmp_path / "a", "u", "png"), Block(names[:3], names[:3], sizes[:3], images[:3], probs[:3]))
    mixed = writers.submit_block(UnitSink(tmp_path / "a", "u", "png"), Block(names[3:], names[3:], sizes[3:], images[3:], probs[3:]))
    writers.close()
    records = same.result() + mixed.result()
    assert len(sorted((tmp_path / "a").iterdir())) == 15
    for name, prob, size, image, record in zip(names, probs, sizes, images, records):  # `seg predict --image_path`'s
        files, fg = encode_outputs(Predictor.restore(prob, size), 0.5, image, overlay=True, probability=True)
        assert record == {"input": name, "output": name + "_mask.png", "foreground": round(fg, 6)}
        for suffix, data in files.items():
            assert (tmp_path / "a" / (name + suffix)).read_bytes() == data, name + suffix


@pytest.mark.parametrize("sizes", [[(32, 32)] * 3, [(32, 32), (17, 45), (64, 8), (17, 45)]])
def test_device_postprocess_matches_the_cpu_resize_and_threshold(sizes):
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.random((len(sizes), 32, 32)).astype(np.float32))
    masks, counts, prob16 = postprocess(probs, sizes, 0.4, probability=True)
    for i, (h, w) in enumerate(sizes):
        full = Predictor.restore(probs[i].numpy(), (h, w))
        ref = (full > 0.4).astype(np.uint8) * 255
        assert masks[i].dtype == torch.uint8 and tuple(masks[i].shape) == (h, w)
        near = np.abs(full - 0.4) < 1e-5  # torch and OpenCV bilinear agree to ~2e-6
        assert np.array_equal(masks[i].numpy()[~near], ref[~near])
        assert abs(int(counts[i]) - int((full > 0.4).sum())) <= int(near.sum())
        ref16 = np.round(np.clip(full, 0, 1) * 65535).astype(np.uint16)
        assert np.abs(prob16[i].numpy().astype(np.int64) - ref16).max() <= 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlay", [False, True])
def test_cohort_through_the_device_path_on_cpu_equals_the_cpu_path(tmp_path, ckpt, overlay):
    folder = _cohort(tmp_path / "in", 21)
    units = build_units(str(folder), None, None, 8)
    outputs = {}
    for name, device_post in (("cpu", False), ("device", True)):
        p = Predictor(ckpt, device="cpu", precision="fp32", batch_size=4)
        opts = PredictConfig(output_dir=str(tmp_path / name), save_overlay=overlay, save_probability=True,
                             num_workers=2, writer_threads=2, progress=False, qc=False)
        run = CohortRun(p, units, 0, 1, opts)
        run.batches = BatchForward(p, probability=True, device_post=device_post)
        summary = run.run()
        assert summary["images"] == 21 and summary["failures"] == 0
        outputs[name] = {f.relative_to(tmp_path / name).as_posix(): f for f in (tmp_path / name).rglob("*.png")}
    assert sorted(outputs["cpu"]) == sorted(outputs["device"]) and len(outputs["cpu"]) == 21 * (3 if overlay else 2)
    for rel, path in outputs["cpu"].items():
        a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int64)
        b = cv2.imread(str(outputs["device"][rel]), cv2.IMREAD_UNCHANGED).astype(np.int64)
        if rel.endswith("_prob.png"):
            assert np.abs(a - b).max() <= 1, rel
        else:  # a mask pixel may flip only where the probability is within ~2e-6 of the threshold
            differ = (a != b).any(axis=-1) if a.ndim == 3 else a != b
            assert differ.mean() < 1e-3, rel


@pytest.mark.timeout(120)
def test_compiled_batches_are_padded_to_one_shape(ckpt):
    p = Predictor(ckpt, device="cpu", precision="fp32", batch_size=4)
    raw = torch.from_numpy(np.stack([random_image(32, 32, seed=i) for i in range(3)]))
    eager = p.forward_raw(raw)
    batches = BatchForward(p)
    batches.compile_model("default", backend="eager")  # the plumbing; inductor itself is for CUDA
    assert isinstance(p.model, torch._dynamo.eval_frame.OptimizedModule)
    assert batches._pad(raw).shape[0] == 4  # the last, smaller batch runs in the compiled shape
    out = batches.launch(raw, [(32, 32)] * 3).result()
    assert out.probs.shape == (3, 32, 32) and np.allclose(out.probs, eager, atol=1e-6)


def test_compile_is_refused_for_unknown_modes_and_skipped_on_cpu(ckpt):
    p = Predictor(ckpt, device="cpu", precision="fp32", batch_size=4)
    with pytest.raises(ValueError, match="allowed values are off"):
        BatchForward(p, compile="fast")
    with pytest.warns(UserWarning, match="CUDA in resize mode only"):
        batches = BatchForward(p, compile="default")
    assert batches.pad_to is None and not isinstance(p.model, torch._dynamo.eval_frame.OptimizedModule)
