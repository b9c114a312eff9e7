"""Every documented value of every config field works, as a flag and as a dotted override.

The values are read from the dataclasses themselves (``Literal`` types, bools, defaults), so a
field added later is covered without editing this file. YAML 1.1 read ``no`` as a boolean and
refused ``train.mixed_precision=no``; these tests walk the fields so that cannot come back.
"""

import argparse
import dataclasses

import pytest

from seg.config import EvaluateConfig, PredictConfig, build_config
from seg.config.fields import add_flags, choices, field_docs, field_types
from seg.config.training import SECTIONS, add_config_arguments, config_from_args


def _values(f: dataclasses.Field, tp) -> list:
    """The documented values of a field: every allowed value and alias, both booleans, or its default."""
    allowed = choices(tp)
    if allowed is not None:
        return [*allowed, *f.metadata.get("aliases", {})]
    if tp is bool:
        return [True, False]
    default = f.default if f.default is not dataclasses.MISSING else None
    return [default] if default is not None else []


TRAIN_CASES = [(section, f, value) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               for value in _values(f, field_types(cls)[f.name])]


def _expected(f, value):
    return f.metadata.get("aliases", {}).get(value, value) if isinstance(value, str) else value


@pytest.mark.parametrize("section, f, value", TRAIN_CASES, ids=[f"{s}.{f.name}={v}" for s, f, v in TRAIN_CASES])
def test_every_training_value_as_override(section, f, value):
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if f.name == "image_size":
        text = "64"
        value = 64
    cfg = build_config(overrides=[f"{section}.{f.name}={text}"])
    assert getattr(getattr(cfg, section), f.name) == _expected(f, value)


@pytest.mark.parametrize("section, f, value", [c for c in TRAIN_CASES if "flag" in c[1].metadata],
                         ids=[f"{s}.{f.name}={v}" for s, f, v in TRAIN_CASES if "flag" in f.metadata])
def test_every_training_value_as_flag(section, f, value):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    option = f.metadata["flag"] if isinstance(f.metadata["flag"], str) else f"--{f.name}"
    if isinstance(value, bool):
        negated = option.startswith("--no_")
        argv = [option] if value != negated else []
    else:
        argv = [option, str(value)]
    cfg = config_from_args(parser.parse_intermixed_args(argv))
    assert getattr(getattr(cfg, section), f.name) == _expected(f, value)


def test_mixed_precision_no_everywhere(tmp_path):
    """`no` (YAML 1.1's false) is the accepted alias of fp32 in a file, a flag and an override."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  deterministic: yes\n")
    cfg = build_config(path)  # YAML 1.2 reads both as strings; each field's type decides
    assert (cfg.train.mixed_precision, cfg.train.deterministic) == ("fp32", True)
    assert build_config(overrides=["train.mixed_precision=no"]).train.mixed_precision == "fp32"
    with pytest.raises(ValueError, match=r"train\.mixed_precision=False is not valid"):
        build_config(overrides=["train.mixed_precision=false"])  # a real boolean is not a precision


@pytest.mark.parametrize("cls", [PredictConfig, EvaluateConfig])
def test_every_inference_value_as_flag(cls):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        for value in _values(f, tp):
            option = parser._option_string_actions  # noqa: SLF001 - find the option of this field
            flag = next(o for o, a in option.items() if a.dest == f.name)
            if isinstance(value, bool):
                argv = [flag] if (value is True) != flag.startswith("--no_") else []
            else:
                argv = [flag, str(value)]
            got = getattr(cls(**vars(parser.parse_args(argv))), f.name)
            assert got == _expected(f, value), (f.name, value)


@pytest.mark.parametrize("cls", [c for c in SECTIONS.values()] + [PredictConfig, EvaluateConfig])
def test_every_field_is_documented(cls):
    """Help text and docs come from the attribute docstrings: none may be missing."""
    missing = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_inference_validation_names_the_field():
    with pytest.raises(ValueError, match=r"batch_size=0 is not valid; it must be >= 1"):
        PredictConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"format='zip' is not valid; allowed values are 'png', 'tar'"):
        PredictConfig(format="zip")
    with pytest.raises(ValueError, match=r"tile_size=8 is not valid"):
        EvaluateConfig(tile_size=8)
