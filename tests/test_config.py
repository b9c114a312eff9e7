"""Config: presets load, precedence, unknown keys, bad values, the original scripts' flags, YAML round trip, safe_load."""

import argparse
from pathlib import Path

import pytest
import yaml

from seg.config import (Config, add_config_arguments, build_config, config_from_args, config_from_dict,
                        config_to_dict, config_to_yaml, defaults_yaml, valid_keys)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def test_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"default.yaml", "cpu-smoke.yaml", "medical-512.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(preset):
    cfg = build_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.data.image_size % 16 == 0


def test_default_preset_is_the_code_defaults():
    assert config_to_dict(build_config(CONFIGS / "default.yaml")) == config_to_dict(Config())
    # the file is generated from the dataclasses (values, docstrings, allowed values): regenerate
    # it with `python -m seg.config > configs/default.yaml` after changing a default or a docstring
    assert (CONFIGS / "default.yaml").read_text() == defaults_yaml()


def test_cpu_smoke_preset_is_small():
    cfg = build_config(CONFIGS / "cpu-smoke.yaml")
    assert cfg.model.base_channels <= 8 and cfg.data.image_size <= 64 and cfg.data.num_workers <= 1
    assert 0 < cfg.train.max_steps_per_epoch <= 10 and cfg.train.epochs <= 2


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_flags_overrides(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.01\n  epochs: 7\ndata:\n  image_size: 128\n")
    assert build_config(path).train.lr == 0.01
    cfg = build_config(path, {"train.lr": 0.02, "train.batch_size": 3})
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.data.image_size) == (0.02, 7, 3, 128)
    cfg = build_config(path, {"train.lr": 0.02}, ["train.lr=3e-4", "model.base_channels=16"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.model.base_channels == 16 and cfg.train.epochs == 7
    assert cfg.train.loss == Config().train.loss  # untouched fields keep the code default


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key train\.lrr; valid keys are .*train\.lr,"):
        build_config(_write(tmp_path, "train:\n  lrr: 0.1\n"))
    with pytest.raises(ValueError, match=r"unknown config section 'optim'; valid keys are data\.data_dir"):
        build_config(_write(tmp_path, "optim:\n  lr: 0.1\n"))
    with pytest.raises(ValueError, match=r"unknown config key model\.depth"):
        build_config(overrides=["model.depth=5"])
    with pytest.raises(ValueError, match="section.field=value"):
        build_config(overrides=["lr=0.1"])
    assert "train.lr" in valid_keys() and "data.sampling" in valid_keys()


@pytest.mark.parametrize("override, message", [
    ("train.loss=focal", r"train\.loss='focal' is not valid; allowed values are 'bce', 'dice', 'combined'"),
    ("data.image_size=100", r"data\.image_size=100 .* multiple of 16 .* e\.g\. 96"),
    ("train.epochs=abc", r"train\.epochs='abc' is not valid; expected a value of type int"),
    ("train.lr=0", r"train\.lr=0\.0 is not valid; it must be > 0"),
    ("data.in_channels=2", r"data\.in_channels=2"),
    ("train.threshold=1.5", r"train\.threshold=1\.5"),
    ("model.bilinear=maybe", r"model\.bilinear='maybe'.*bool"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides=[override])


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_seed_flags_map_onto_fields():
    cfg = _parse(["--data_dir", "shards", "--epochs", "3", "--batch_size", "4", "--lr", "1e-4", "--loss", "dice",
                  "--image_size", "128", "--checkpoint_dir", "runs/x", "--save_every", "2",
                  "--bilinear", "--scheduler"])
    assert (cfg.data.data_dir, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.loss) == \
        ("shards", 3, 4, 1e-4, "dice")
    assert (cfg.data.image_size, cfg.train.checkpoint_dir, cfg.train.save_every) == (128, "runs/x", 2)
    assert cfg.model.bilinear is True and cfg.train.scheduler == "plateau"  # bare --scheduler, as in the original scripts
    assert _parse(["--scheduler", "cosine"]).train.scheduler == "cosine"
    plain = _parse([])
    assert plain.model.bilinear is False and plain.train.scheduler == "plateau"  # sound default for real data
    assert _parse(["--lr", "0.5", "train.lr=0.25"]).train.lr == 0.25  # overrides win over flags


def test_bare_scheduler_before_an_override():
    """argparse hands `--scheduler` the next word; a dotted override there stays an override."""
    cfg = _parse(["--scheduler", "train.lr=0.25", "model.base_channels=8"])
    assert (cfg.train.scheduler, cfg.train.lr, cfg.model.base_channels) == ("plateau", 0.25, 8)
    with pytest.raises(SystemExit):
        _parse(["--scheduler", "step"])


def test_flags_win_over_yaml(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 9\n  scheduler: cosine\n")
    cfg = _parse(["--config", str(path), "--epochs", "2"])
    assert cfg.train.epochs == 2 and cfg.train.scheduler == "cosine"


def test_yaml_round_trip(tmp_path):
    cfg = build_config(CONFIGS / "medical-512.yaml", {"train.lr": 2e-4}, ["data.sampling=patch"])
    text = config_to_yaml(cfg)
    assert build_config(_write(tmp_path, text)) == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_only_safe_yaml_is_read(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(yaml.YAMLError, match="python/object"):
        build_config(path)
    assert not marker.exists()
    with pytest.raises(yaml.YAMLError):
        build_config(overrides=[f"train.checkpoint_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_missing_config_file_points_at_presets(tmp_path):
    with pytest.raises(FileNotFoundError, match="presets are in configs/"):
        build_config(tmp_path / "nope.yaml")
