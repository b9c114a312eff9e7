"""Shard reading: every sample exactly once over ranks x workers, loud errors, raw-folder hint."""

import json
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from seg.data.shards import (ShardSampleError, SkipCounter, check_enough_shards, decode_sample, load_dataset_info,
                             shard_pipeline, shard_urls)
from seg.data.transforms import build_eval_transform, build_train_transform

SIZE = 32


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def write_shards(folder, n_shards=5, per_shard=3, labelled=True, split="train", corrupt=None):
    """Hand-made shards in the `seg prepare` layout; key i's image encodes i in its pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for s in range(n_shards):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(per_shard):
                key = f"case{i:03d}/img_{i}"
                image = np.full((SIZE, SIZE + 16), i, np.uint8)
                mask = np.zeros((SIZE, SIZE + 16), np.uint8)
                mask[: i % SIZE + 1] = 255
                sample = {"__key__": key, "image.png": _png(image),
                          "json": json.dumps({"image": f"{key}.png", "height": SIZE, "width": SIZE + 16}).encode()}
                if labelled:
                    sample["mask.png"] = _png(mask)
                if key == corrupt:
                    sample["image.png"] = sample["image.png"][:40]
                sink.write(sample)
                i += 1
        shards.append({"name": name, "count": per_shard, "bytes": (folder / name).stat().st_size})
    info = {"format_version": 1, "splits": {split: {"count": i, "shards": shards}},
            "channels": {"mean": [0.1, 0.1, 0.1], "std": [0.2, 0.2, 0.2]}}
    (folder / "dataset.json").write_text(json.dumps(info))
    return info


def _eval():
    return build_eval_transform(SIZE, [0.0], [1.0], in_channels=1)


def test_every_sample_once_over_two_nodes_and_two_workers(tmp_path):
    write_shards(tmp_path, n_shards=5)
    urls = shard_urls(tmp_path, "train")
    assert urls == sorted(urls) and len(urls) == 5
    seen = Counter()
    for rank in range(2):
        for worker in range(2):
            pipe = shard_pipeline(urls, _eval(), rank=rank, world_size=2, worker=worker, num_workers=2,
                                  shuffle_shards=True, shuffle_buffer=4, seed=3, epoch=1)
            keys = [key for _, _, key, _ in pipe]
            seen.update(keys)
    assert sorted(seen) == [f"case{i:03d}/img_{i}" for i in range(15)]
    assert set(seen.values()) == {1}


def test_decoded_values_follow_their_key(tmp_path):
    write_shards(tmp_path, n_shards=2)
    native = build_eval_transform(SIZE, [0.0], [1.0], in_channels=1, sampling="patch")
    for image, mask, key, _ in shard_pipeline(shard_urls(tmp_path, "train"), native, split_by_node=False):
        i = int(key.rsplit("_", 1)[1])
        assert image.shape == (1, SIZE, SIZE + 16) and image.dtype == torch.float32
        assert torch.allclose(image, torch.full_like(image, i / 255))
        assert mask.shape == (1, SIZE, SIZE + 16)
        assert int(mask[0, :, 0].sum()) == i % SIZE + 1


def test_dataloader_workers_split_shards_and_collate(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=2)
    pipe = shard_pipeline(shard_urls(tmp_path, "train"), build_train_transform(SIZE, [0.0] * 3, [1.0] * 3, seed=0))
    loader = torch.utils.data.DataLoader(pipe, batch_size=2, num_workers=2)
    keys = []
    for images, masks, batch_keys, skipped in loader:
        assert images.shape == (2, 3, SIZE, SIZE) and masks.shape == (2, 1, SIZE, SIZE)
        assert skipped.tolist() == [0, 0]  # no handler: nothing is ever skipped
        keys += list(batch_keys)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 8


def test_order_and_augmentation_depend_on_seed_and_epoch(tmp_path):
    write_shards(tmp_path, n_shards=4)
    urls = shard_urls(tmp_path, "train")

    def run(seed, epoch):
        tr = build_train_transform(SIZE, [0.0], [1.0], in_channels=1)
        out = list(shard_pipeline(urls, tr, shuffle_shards=True, shuffle_buffer=5, seed=seed, epoch=epoch))
        return [k for _, _, k, _ in out], torch.stack([m for _, m, _, _ in out])

    keys_a, masks_a = run(1, 0)
    keys_b, masks_b = run(1, 0)
    assert keys_a == keys_b and torch.equal(masks_a, masks_b)
    keys_c, _ = run(1, 1)
    assert keys_c != keys_a and sorted(keys_c) == sorted(keys_a)
    pipe = shard_pipeline(urls, _eval(), shuffle_shards=True, shuffle_buffer=5, seed=1, epoch=1)
    assert [k for _, _, k, _ in pipe] == keys_c


def test_resampled_streams_forever(tmp_path):
    write_shards(tmp_path, n_shards=2)
    pipe = shard_pipeline(shard_urls(tmp_path, "train"), _eval(), resampled=True, seed=0)
    it = iter(pipe)
    keys = [next(it)[2] for _ in range(20)]
    assert len(keys) == 20 and set(keys) <= {f"case{i:03d}/img_{i}" for i in range(6)}


def test_unlabelled_shards_cannot_be_trained_on(tmp_path):
    write_shards(tmp_path, n_shards=1, labelled=False, split="data")
    with pytest.raises(ShardSampleError, match="has no mask.png: unlabelled shards cannot be trained on"):
        list(shard_pipeline(shard_urls(tmp_path, "data"), _eval()))


def test_decode_error_names_shard_and_key(tmp_path):
    write_shards(tmp_path, n_shards=2, corrupt="case004/img_4")
    urls = shard_urls(tmp_path, "train")
    with pytest.raises(ShardSampleError, match=r"case004/img_4.*train-000001\.tar"):
        list(shard_pipeline(urls, _eval()))
    counter = SkipCounter(warn=False)
    out = list(shard_pipeline(urls, _eval(), handler=counter))
    keys = [k for _, _, k, _ in out]
    assert len(keys) == 5 and "case004/img_4" not in keys
    assert sum(skipped for *_, skipped in out) == 1  # the count travels with the next sample
    assert counter.count == 1 and "case004/img_4" in counter.messages[0]


def test_decode_sample_checks_members():
    with pytest.raises(ShardSampleError, match="'k1' in shard s.tar.*expected one image"):
        decode_sample({"__key__": "k1", "__url__": "s.tar", "json": b"{}"})
    image = _png(np.zeros((4, 5), np.uint8))
    with pytest.raises(ShardSampleError, match="differ in size"):
        decode_sample({"__key__": "k", "__url__": "s.tar", "image.png": image, "mask.png": _png(np.zeros((5, 5), np.uint8))})
    s = decode_sample({"__key__": "k", "__url__": "s.tar", "image.png": image, "json": b'{"height": 4}'})
    assert s["mask"] is None and s["meta"] == {"height": 4} and s["image"].shape == (4, 5)


def test_raw_folder_error_shows_prepare_command(tmp_path):
    (tmp_path / "raw" / "images").mkdir(parents=True)
    (tmp_path / "raw" / "masks").mkdir()
    raw = tmp_path / "raw"
    with pytest.raises(ValueError) as err:
        load_dataset_info(raw)
    assert f"seg prepare --images {raw}/images --masks {raw}/masks --out {raw}_shards" in str(err.value)


def test_missing_split_and_missing_shard(tmp_path):
    write_shards(tmp_path, n_shards=2)
    with pytest.raises(ValueError, match="no split 'val'; it has train"):
        shard_urls(tmp_path, "val")
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        shard_urls(tmp_path, "train")


def test_too_few_shards_for_readers():
    check_enough_shards(4, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="3 training shard.*2 rank.*2 worker.*Lower data.num_workers"):
        check_enough_shards(3, world_size=2, num_workers=2)
