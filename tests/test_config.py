"""FarmerConfig: validation, JSON round trip, presets."""

import pytest

from farmer import FarmerConfig
from farmer.config import PRESETS


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
