"""FarmerConfig: validation, JSON round trip, presets."""

import math

import pytest

from farmer import FarmerConfig
from farmer.config import PRESETS, field_kinds, parse_assignments
from farmer.train import TrainConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name: str, tmp_path) -> None:
    config = FarmerConfig.preset(name)
    assert FarmerConfig.from_dict(config.to_dict()) == config
    config.to_json(tmp_path / "config.json")
    assert FarmerConfig.from_json(tmp_path / "config.json") == config
    assert config.num_dims == config.channels * config.image_size**2
    assert config.informative_dim + config.redundant_dim == config.token_dim


def test_paper_split_at_patch_16() -> None:
    config = FarmerConfig.preset("imagenet256-1.1b-p16")
    assert (config.token_dim, config.informative_dim, config.redundant_dim) == (768, 128, 640)
    assert (config.informative_components, config.redundant_components, config.condition_repeat) == (64, 200, 64)


@pytest.mark.parametrize(("changes", "message"), [
    ({"patch_size": 3}, "divisible"),
    ({"informative_channels": 99}, "informative_channels"),
    ({"prior": "diffusion"}, "prior"),
    ({"permutation": "random"}, "permutation"),
    ({"flow_blocks": 0}, "flow_blocks"),
    ({"label_dropout": 1.5}, "label_dropout"),
    ({"flow_width": 40, "head_dim": 16}, "multiple of head_dim"),
])
def test_invalid_configs_name_the_problem(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FarmerConfig.preset("tiny").replace(**changes)


def test_unknown_fields_and_presets_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown FarmerConfig field"):
        FarmerConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        FarmerConfig.preset("huge")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FarmerConfig.from_json(tmp_path / "bad.json")


# Strict types (issue #12) --------------------------------------------------------------------------------
def _float_fields(cls: type) -> list[str]:
    return [name for name, (kind, _) in field_kinds(cls).items() if kind is float]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(bad: float) -> None:
    assert len(_float_fields(FarmerConfig)) >= 5 and len(_float_fields(TrainConfig)) >= 8
    for name in _float_fields(FarmerConfig):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            FarmerConfig.preset("tiny").replace(**{name: bad})
    for name in _float_fields(TrainConfig):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            TrainConfig(**{name: bad})


@pytest.mark.parametrize(("changes", "message"), [
    ({"final_permute": "False"}, "final_permute must be bool, got 'False'"),
    ({"channel_mixing": 1}, "channel_mixing must be bool, got 1"),
    ({"distilled_inverse": None}, "distilled_inverse must be bool"),
    ({"flow_blocks": True}, "flow_blocks must be int"),
    ({"flow_width": 64.0}, "flow_width must be int"),
    ({"informative_channels": "2"}, "informative_channels must be int or None"),
    ({"patch_transform": "fft"}, "patch_transform must be one of"),
    ({"patch_transform": 0}, "patch_transform must be str"),
    ({"redundant_mixture": "per-token"}, "redundant_mixture must be one of"),
    ({"label_dropout": "0.1"}, "label_dropout must be float"),
])
def test_field_types_are_strict(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FarmerConfig.preset("tiny").replace(**changes)


def test_integers_are_accepted_for_float_fields_as_floats() -> None:
    config = FarmerConfig.preset("tiny").replace(log_scale_bound=3, label_dropout=0)
    assert type(config.log_scale_bound) is float and type(config.label_dropout) is float
    assert type(TrainConfig(lr=1).lr) is float
    with pytest.raises(ValueError, match="steps must be int"):
        TrainConfig.from_dict({"steps": "400"})
    with pytest.raises(ValueError, match="a TrainConfig must be an object/dict"):
        TrainConfig.from_dict("tiny")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a FarmerConfig must be an object/dict"):
        FarmerConfig.from_dict("tiny")  # type: ignore[arg-type]


@pytest.mark.parametrize(("pair", "value"), [
    ("final_permute=False", False), ("final_permute=no", False), ("final_permute=0", False),
    ("final_permute=YES", True), ("channel_mixing=true", True), ("channel_mixing=1", True),
    ("informative_channels=None", None), ("informative_channels=null", None), ("informative_channels=3", 3),
    ("log_scale_bound=2", 2.0), ("noise_std_end=1e-3", 1e-3), ("patch_transform=dct", "dct"),
    ("redundant-mixture=per_token", "per_token"),
])
def test_set_values_are_typed_by_the_field(pair: str, value: object) -> None:
    key = pair.partition("=")[0].replace("-", "_")
    parsed = parse_assignments(FarmerConfig, [pair])
    assert parsed == {key: value} and type(parsed[key]) is type(value)
    assert getattr(FarmerConfig.preset("tiny").replace(**parsed), key) == value


@pytest.mark.parametrize(("pair", "message"), [
    ("label_dropout=abc", "'label_dropout' must be a finite number, got 'abc'"),
    ("noise_std_end=nan", "'noise_std_end' must be a finite number"),
    ("log_scale_bound=NaN", "'log_scale_bound' must be a finite number"),
    ("log_scale_bound=inf", "'log_scale_bound' must be a finite number"),
    ("final_permute=maybe", "'final_permute' must be true or false"),
    ("flow_blocks=2.5", "'flow_blocks' must be an integer"),
    ("flow_blocks=none", "'flow_blocks' must be an integer"),
    ("widht=3", "unknown FarmerConfig field 'widht'"),
    ("final_permute", "takes KEY=VALUE"),
])
def test_bad_set_values_name_the_field(pair: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_assignments(FarmerConfig, [pair])


def test_every_train_config_field_parses_through_the_same_parser() -> None:
    defaults = TrainConfig()
    pairs = [f"{name}={'none' if value is None else str(value).lower()}" for name, value in defaults.to_dict().items()]
    assert TrainConfig(**parse_assignments(TrainConfig, pairs, "--train-set")) == defaults
    assert parse_assignments(TrainConfig, ["weight_decay=0.01", "min_lr=0", "grad_clip=0.5", "ema_decay=0.9",
                                           "warmup_steps=7", "data_root=none"]) == {
        "weight_decay": 0.01, "min_lr": 0.0, "grad_clip": 0.5, "ema_decay": 0.9, "warmup_steps": 7, "data_root": None}
