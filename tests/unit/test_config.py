"""DetectorConfig: defaults, loading from dicts and YAML, validation messages, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from defectscope.config import (
    BackboneConfig,
    CalibrationConfig,
    CoresetConfig,
    DetectorConfig,
    FeatureConfig,
    ScoringConfig,
)
from defectscope.errors import ConfigError, DefectscopeError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------ defaults


def test_defaults() -> None:
    config = DetectorConfig()
    assert config.backbone.name == "tf_efficientnet_lite0"
    assert config.backbone.weights == "default"
    assert config.backbone.layers is None
    assert config.features.input_size == (256, 256)
    assert config.features.aspect == "auto"
    assert config.features.large_image_scale == 2.0
    assert config.features.neighbourhood == 1
    assert config.features.normalize == "l2"
    assert config.features.embedding_dim is None
    assert config.coreset.method == "sharded"
    assert config.coreset.ratio == 0.02
    assert config.coreset.size is None
    assert config.coreset.projection_dim == 128
    assert config.coreset.shard_size == 16384
    assert config.coreset.seed == 0
    assert config.scoring.k == 1
    assert config.scoring.reduction == "max"
    assert config.scoring.smoothing_sigma == 4.0
    assert config.scoring.knn_backend == "auto"
    assert config.calibration.method == "leave_one_out"
    assert config.calibration.false_alarm_rate == 0.01
    assert config.device == "auto"
    assert config.batch_size == 16
    assert config.half_precision is False
    assert config.auto.enabled is True
    assert config.auto.candidates == ["l2", "power_balanced"]


@pytest.mark.parametrize("empty", [None, {}])
def test_from_dict_empty_gives_defaults(empty: dict | None) -> None:
    assert DetectorConfig.from_dict(empty) == DetectorConfig()


def test_sections_are_independent_instances() -> None:
    a, b = DetectorConfig(), DetectorConfig()
    a.coreset.ratio = 0.5
    assert b.coreset.ratio == 0.02


# ----------------------------------------------------------------- from_dict


def test_from_dict_partial_section_keeps_other_defaults() -> None:
    config = DetectorConfig.from_dict(
        {"coreset": {"ratio": 0.25, "method": "greedy"}, "features": {"input_size": [128, 96]}}
    )
    assert config.coreset.ratio == 0.25
    assert config.coreset.method == "greedy"
    assert config.coreset.projection_dim == 128
    assert config.features.input_size == (128, 96)
    assert config.scoring == ScoringConfig()


@pytest.mark.parametrize(
    ("data", "field_path"),
    [
        ({"coreset": {"ratio": 0.0}}, "coreset.ratio"),
        ({"coreset": {"ratio": 1.5}}, "coreset.ratio"),
        ({"coreset": {"ratio": -0.1}}, "coreset.ratio"),
        ({"coreset": {"size": 0}}, "coreset.size"),
        ({"coreset": {"method": "kmeans"}}, "coreset.method"),
        ({"coreset": {"projection_dim": 2}}, "coreset.projection_dim"),
        ({"coreset": {"shard_size": 10}}, "coreset.shard_size"),
        ({"features": {"neighbourhood": 0}}, "features.neighbourhood"),
        ({"features": {"neighbourhood": 10}}, "features.neighbourhood"),
        ({"features": {"input_size": [16, 256]}}, "features.input_size"),
        ({"features": {"input_size": [256, 4096]}}, "features.input_size"),
        ({"features": {"aspect": "crop"}}, "features.aspect"),
        ({"features": {"embedding_dim": 4}}, "features.embedding_dim"),
        ({"features": {"max_downscale": 0.5}}, "features.max_downscale"),
        ({"features": {"max_downscale": 20}}, "features.max_downscale"),
        ({"features": {"max_downscale": "big"}}, "features.max_downscale"),
        ({"features": {"padding": "zero"}}, "features.padding"),
        ({"coreset": {"min_size": 0}}, "coreset.min_size"),
        ({"coreset": {"min_size": "many"}}, "coreset.min_size"),
        ({"auto": {"defects_per_image": 0}}, "auto.defects_per_image"),
        ({"auto": {"defects_per_image": 11}}, "auto.defects_per_image"),
        ({"auto": {"reductions": ["mean"]}}, "auto.reductions.0"),
        ({"auto": {"reductions": []}}, "auto.reductions"),
        ({"scoring": {"k": 0}}, "scoring.k"),
        ({"scoring": {"k": 65}}, "scoring.k"),
        ({"scoring": {"reduction": "mean"}}, "scoring.reduction"),
        ({"scoring": {"smoothing_sigma": -1.0}}, "scoring.smoothing_sigma"),
        ({"scoring": {"knn_backend": "annoy"}}, "scoring.knn_backend"),
        ({"scoring": {"chunk_size": 8}}, "scoring.chunk_size"),
        ({"scoring": {"topk_fraction": 0.0}}, "scoring.topk_fraction"),
        ({"calibration": {"false_alarm_rate": 0.5}}, "calibration.false_alarm_rate"),
        ({"calibration": {"false_alarm_rate": 0.0}}, "calibration.false_alarm_rate"),
        ({"calibration": {"holdout_fraction": 1.0}}, "calibration.holdout_fraction"),
        ({"calibration": {"method": "bootstrap"}}, "calibration.method"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2048}, "batch_size"),
        ({"coreset": {"ratio": "lots"}}, "coreset.ratio"),
    ],
)
def test_out_of_range_values_name_the_field(data: dict, field_path: str) -> None:
    with pytest.raises(ConfigError) as info:
        DetectorConfig.from_dict(data)
    message = str(info.value)
    assert message.startswith("invalid configuration:")
    assert f"  {field_path}:" in message


def test_config_error_is_a_defectscope_error() -> None:
    assert issubclass(ConfigError, DefectscopeError)


def test_input_size_message_gives_reason() -> None:
    with pytest.raises(ConfigError, match="between 32 and 2048 pixels"):
        DetectorConfig.from_dict({"features": {"input_size": [31, 64]}})


@pytest.mark.parametrize("size", [[32, 32], [2048, 2048], [32, 2048]])
def test_input_size_bounds_inclusive(size: list[int]) -> None:
    config = DetectorConfig.from_dict({"features": {"input_size": size}})
    assert config.features.input_size == tuple(size)


@pytest.mark.parametrize(
    ("data", "field_path"),
    [
        ({"coreset": {"ration": 0.1}}, "coreset.ration"),
        ({"colour": "red"}, "colour"),
        ({"scoring": {"k": 1, "knn": "torch"}}, "scoring.knn"),
        ({"backbone": {"name": "x", "pretrained": True}}, "backbone.pretrained"),
    ],
)
def test_unknown_key_is_rejected_with_its_path(data: dict, field_path: str) -> None:
    with pytest.raises(ConfigError) as info:
        DetectorConfig.from_dict(data)
    assert f"  {field_path}:" in str(info.value)
    assert "extra" in str(info.value).lower()


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        DetectorConfig.from_dict({"coreset": {"ratio": 2.0}, "scoring": {"k": 0}})
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert any(line.startswith("  coreset.ratio:") for line in lines)
    assert any(line.startswith("  scoring.k:") for line in lines)


def test_edge_correction_is_a_yes_or_no() -> None:
    assert DetectorConfig().scoring.edge_correction is True
    off = DetectorConfig.from_dict({"scoring": {"edge_correction": False}})
    assert off.scoring.edge_correction is False
    with pytest.raises(
        ConfigError, match=r"scoring\.edge_correction: Input should be a valid bool"
    ):
        DetectorConfig.from_dict({"scoring": {"edge_correction": "maybe"}})


def test_validate_assignment_rejects_bad_value() -> None:
    config = DetectorConfig()
    with pytest.raises(ValueError):
        config.coreset.ratio = 3.0
    config.coreset.ratio = 0.3
    assert config.coreset.ratio == 0.3


# -------------------------------------------------------------------- device


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_valid_devices(device: str) -> None:
    assert DetectorConfig.from_dict({"device": device}).device == device


@pytest.mark.parametrize("device", ["gpu", "CPU", "mps", "tpu:0", ""])
def test_invalid_device(device: str) -> None:
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N") as info:
        DetectorConfig.from_dict({"device": device})
    assert repr(device) in str(info.value)


def test_device_assignment_is_validated() -> None:
    # Detector.load assigns config.device; a valid one is accepted, a bad one refused.
    config = DetectorConfig()
    config.device = "cpu"
    assert config.device == "cpu"
    with pytest.raises(ConfigError, match="device must be"):
        config.device = "gpu"


# ----------------------------------------------------------------- from_yaml


def test_from_yaml_valid(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "coreset:\n  ratio: 0.05\n  method: random\nscoring:\n  k: 3\ndevice: cpu\n",
    )
    config = DetectorConfig.from_yaml(path)
    assert config.coreset.ratio == 0.05
    assert config.coreset.method == "random"
    assert config.scoring.k == 3
    assert config.device == "cpu"
    assert config.features == FeatureConfig()


def test_from_yaml_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "batch_size: 4\n")
    assert DetectorConfig.from_yaml(str(path)).batch_size == 4


def test_from_yaml_detector_wrapper_key(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "detector:\n  coreset:\n    ratio: 0.2\n  backbone:\n    name: tf_efficientnet_lite1\n",
    )
    config = DetectorConfig.from_yaml(path)
    assert config.coreset.ratio == 0.2
    assert config.backbone.name == "tf_efficientnet_lite1"


def test_from_yaml_wrapper_errors_still_name_field(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "detector:\n  coreset:\n    ratio: 7\n")
    with pytest.raises(ConfigError) as info:
        DetectorConfig.from_yaml(path)
    assert "coreset.ratio" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n"])
def test_from_yaml_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert DetectorConfig.from_yaml(write(tmp_path / "c.yaml", text)) == DetectorConfig()


def test_from_yaml_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        DetectorConfig.from_yaml(missing)
    assert "nope.yaml" in str(info.value)


def test_from_yaml_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        DetectorConfig.from_yaml(tmp_path)


def test_from_yaml_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "coreset: [ratio: 0.1\n  method: {\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        DetectorConfig.from_yaml(path)
    assert "bad.yaml" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just a string\n"])
def test_from_yaml_non_mapping_top_level(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError, match="expected a mapping at the top level") as info:
        DetectorConfig.from_yaml(path)
    assert "list.yaml" in str(info.value)


def test_from_yaml_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "coreset:\n  ratios: 0.1\n")
    with pytest.raises(ConfigError) as info:
        DetectorConfig.from_yaml(path)
    assert "coreset.ratios" in str(info.value)


def test_from_yaml_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "coreset:\n  ratio: 1.5\n")
    with pytest.raises(ConfigError) as info:
        DetectorConfig.from_yaml(path)
    assert "coreset.ratio" in str(info.value)


def test_from_yaml_bad_device(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "device: gpu\n")
    with pytest.raises(ConfigError, match="device must be"):
        DetectorConfig.from_yaml(path)


# ------------------------------------------------------------------ to_dict


def test_to_dict_is_plain_json_types() -> None:
    data = DetectorConfig().to_dict()
    assert data["features"]["input_size"] == [256, 256]  # tuple dumped as a list
    assert set(data) == {
        "backbone",
        "features",
        "coreset",
        "scoring",
        "calibration",
        "fit",
        "auto",
        "few_shot",
        "device",
        "batch_size",
        "half_precision",
    }
    assert data["coreset"]["ratio"] == 0.02


def test_to_dict_round_trip() -> None:
    config = DetectorConfig.from_dict(
        {
            "backbone": {"name": "wide_resnet50_2", "weights": "hub", "layers": [2, 3]},
            "features": {"input_size": [224, 320], "aspect": "pad", "embedding_dim": 64},
            "coreset": {"method": "greedy", "size": 100, "projection_dim": None, "seed": 5},
            "scoring": {"k": 3, "reduction": "patchcore", "smoothing_sigma": 0.0},
            "calibration": {"method": "holdout", "holdout_fraction": 0.3},
            "device": "cpu",
            "batch_size": 2,
            "half_precision": True,
        }
    )
    data = config.to_dict()
    again = DetectorConfig.from_dict(data)
    assert again == config
    assert again.to_dict() == data
    assert again.backbone.layers == [2, 3]
    assert again.coreset.projection_dim is None


def test_to_dict_yaml_round_trip(tmp_path: Path) -> None:
    config = DetectorConfig.from_dict({"coreset": {"ratio": 0.3}, "device": "cuda:1"})
    path = write(tmp_path / "c.yaml", yaml.safe_dump({"detector": config.to_dict()}))
    assert DetectorConfig.from_yaml(path) == config


def test_section_classes_defaults_match() -> None:
    config = DetectorConfig()
    assert config.backbone == BackboneConfig()
    assert config.coreset == CoresetConfig()
    assert config.calibration == CalibrationConfig()
