"""Hydra composition of experiments (packaged and custom configs) and sweep expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectscope.config import DetectorConfig
from defectscope.errors import ConfigError
from defectscope.experiment import (
    PACKAGED_CONFIGS,
    Experiment,
    compose,
    config_dir,
    expand_sweep,
    plan_runs,
)

# ------------------------------------------------------------------ config_dir


def test_config_dir_default_is_packaged() -> None:
    assert config_dir(None) == (PACKAGED_CONFIGS, "config")
    assert (PACKAGED_CONFIGS / "config.yaml").is_file()


def test_config_dir_from_folder_and_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / "other.yml").write_text("name: y\n")
    assert config_dir(tmp_path) == (tmp_path.resolve(), "config")
    assert config_dir(tmp_path / "other.yml") == (tmp_path.resolve(), "other")
    assert config_dir(str(tmp_path / "config.yaml")) == (tmp_path.resolve(), "config")


def test_config_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.yaml in this folder"):
        config_dir(tmp_path)
    with pytest.raises(ConfigError, match="config file not found") as info:
        config_dir(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(info.value)
    (tmp_path / "settings.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"config files are YAML \(\.yaml\)") as info:
        config_dir(tmp_path / "settings.json")
    assert "settings.json" in str(info.value)


# --------------------------------------------------------------- packaged compose


def test_compose_packaged_defaults() -> None:
    experiment = compose()
    assert isinstance(experiment, Experiment)
    assert isinstance(experiment.detector, DetectorConfig)
    assert experiment.detector.backbone.name == "tf_efficientnet_lite0"
    assert experiment.detector.backbone.weights == "default"
    assert experiment.data is None
    assert experiment.name == "default"
    assert experiment.overrides == []
    # The packaged config spells out the same values as the code defaults.
    assert experiment.detector == DetectorConfig()
    assert set(experiment.raw) >= {"detector", "data", "name"}


def test_backbone_group_switch() -> None:
    experiment = compose(overrides=["backbone=efficientnet_lite1"])
    assert experiment.detector.backbone.name == "tf_efficientnet_lite1"
    assert experiment.raw["detector"]["backbone"]["name"] == "tf_efficientnet_lite1"
    # Nothing else changes.
    assert experiment.detector.coreset == DetectorConfig().coreset


@pytest.mark.parametrize(
    ("option", "name", "weights"),
    [
        ("wide_resnet50", "wide_resnet50_2", "hub"),
        ("dinov2_vitb14", "vit_base_patch14_dinov2", "hub"),
        ("efficientnet_lite2", "tf_efficientnet_lite2", "default"),
    ],
)
def test_other_backbone_options(option: str, name: str, weights: str) -> None:
    backbone = compose(overrides=[f"backbone={option}"]).detector.backbone
    assert (backbone.name, backbone.weights) == (name, weights)


def test_dotted_overrides() -> None:
    overrides = [
        "detector.coreset.ratio=0.05",
        "detector.scoring.k=3",
        "detector.features.input_size=[128,160]",
        "detector.device=cpu",
        "detector.backbone.weights=random",
        "name=trial",
        "data=/some/where",
    ]
    experiment = compose(overrides=overrides)
    d = experiment.detector
    assert d.coreset.ratio == 0.05
    assert d.scoring.k == 3
    assert d.features.input_size == (128, 160)
    assert d.device == "cpu"
    assert d.backbone.weights == "random"
    assert experiment.name == "trial"
    assert experiment.data == "/some/where"
    assert experiment.overrides == overrides


def test_overrides_list_is_copied() -> None:
    overrides = ["detector.scoring.k=2"]
    experiment = compose(overrides=overrides)
    experiment.overrides.append("x=1")
    assert overrides == ["detector.scoring.k=2"]


def test_append_override_of_an_optional_field() -> None:
    experiment = compose(overrides=["detector.coreset.size=500"])
    assert experiment.detector.coreset.size == 500


def test_experiment_bottle_sets_data_and_name() -> None:
    experiment = compose(overrides=["experiment=bottle"])
    assert experiment.name == "bottle"
    assert experiment.data == "../shared/datasets/mvtec_ad/bottle"
    assert experiment.detector == DetectorConfig()


def test_command_line_beats_experiment_group() -> None:
    experiment = compose(overrides=["experiment=bottle", "name=mine", "data=/d"])
    assert experiment.name == "mine"
    assert experiment.data == "/d"


def test_experiment_with_sweep_keeps_sweep_in_raw() -> None:
    experiment = compose(overrides=["experiment=coreset_sweep"])
    assert experiment.name == "coreset_sweep"
    assert experiment.raw["sweep"] == {"detector.coreset.ratio": [0.01, 0.02, 0.05, 0.1]}


# --------------------------------------------------------------------- errors


def test_unknown_group_option() -> None:
    with pytest.raises(ConfigError, match="cannot compose the configuration") as info:
        compose(overrides=["backbone=resnet9000"])
    assert "resnet9000" in str(info.value)
    assert "\n" not in str(info.value)  # only the first line of Hydra's message


def test_unknown_experiment() -> None:
    with pytest.raises(ConfigError, match="cannot compose") as info:
        compose(overrides=["experiment=carpet"])
    assert "carpet" in str(info.value)


def test_every_detector_field_can_be_set_without_a_plus() -> None:
    # Fields the YAML does not list are set as plainly as those it does.
    experiment = compose(
        overrides=[
            "detector.features.max_downscale=2.0",
            "detector.scoring.reweight_neighbours=5",
            "detector.few_shot.enabled=false",
            "detector.coreset.ratio=0.05",
        ]
    )
    detector = experiment.detector
    assert detector.features.max_downscale == 2.0
    assert detector.scoring.reweight_neighbours == 5
    assert detector.few_shot.enabled is False
    assert detector.coreset.ratio == 0.05
    assert (
        compose(overrides=["detector.features.max_downscale=null"]).detector.features.max_downscale
        is None
    )
    # Their values are still checked, and the message names the field.
    with pytest.raises(ConfigError, match=r"features\.max_downscale"):
        compose(overrides=["detector.features.max_downscale=0.5"])


def test_unknown_key() -> None:
    with pytest.raises(ConfigError, match="cannot compose") as info:
        compose(overrides=["detector.coreset.ration=0.1"])
    assert "detector.coreset.ration" in str(info.value)


def test_unknown_key_added_with_plus_is_caught_by_validation() -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides=["+detector.coreset.ration=0.1"])
    assert "coreset.ration" in str(info.value)


@pytest.mark.parametrize(
    ("override", "field_path"),
    [
        ("detector.coreset.ratio=5", "coreset.ratio"),
        ("detector.coreset.ratio=abc", "coreset.ratio"),
        ("detector.scoring.k=0", "scoring.k"),
        ("detector.features.input_size=[8,8]", "features.input_size"),
        ("detector.coreset.method=kmeans", "coreset.method"),
    ],
)
def test_bad_value(override: str, field_path: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        compose(overrides=[override])
    assert field_path in str(info.value)


def test_bad_device_value() -> None:
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        compose(overrides=["detector.device=gpu"])


@pytest.mark.parametrize("override", ["detector.coreset.ratio", "backbone", "verbose"])
def test_override_without_equals(override: str) -> None:
    with pytest.raises(ConfigError, match="is not of the form key=value") as info:
        compose(overrides=["name=ok", override])
    assert repr(override) in str(info.value)


def test_malformed_override_syntax() -> None:
    with pytest.raises(ConfigError, match="cannot compose"):
        compose(overrides=["detector.coreset.ratio=[0.1"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        compose(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"no config\.yaml"):
        compose(tmp_path)


# ---------------------------------------------------------------- custom configs


def test_custom_config_folder(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "name: custom\n"
        "data: /data/screws\n"
        "detector:\n"
        "  coreset:\n"
        "    ratio: 0.3\n"
        "  scoring:\n"
        "    k: 2\n"
        "  device: cpu\n"
    )
    experiment = compose(tmp_path)
    assert experiment.name == "custom"
    assert experiment.data == "/data/screws"
    assert experiment.detector.coreset.ratio == 0.3
    assert experiment.detector.scoring.k == 2
    assert experiment.detector.device == "cpu"
    # Unspecified sections take the code defaults.
    assert experiment.detector.backbone.name == "tf_efficientnet_lite0"

    experiment = compose(tmp_path / "config.yaml", ["detector.coreset.ratio=0.4"])
    assert experiment.detector.coreset.ratio == 0.4


def test_custom_config_file_with_other_name_and_group(tmp_path: Path) -> None:
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "tiny.yaml").write_text(
        "# @package detector.backbone\nname: tiny_net\nweights: random\n"
    )
    (tmp_path / "mine.yaml").write_text(
        "defaults:\n  - backbone: tiny\n  - _self_\nname: ${data}\ndata: folder\n"
    )
    experiment = compose(tmp_path / "mine.yaml")
    assert experiment.detector.backbone.name == "tiny_net"
    assert experiment.detector.backbone.weights == "random"
    assert experiment.name == "folder"  # interpolations are resolved
    with pytest.raises(ConfigError, match="cannot compose"):
        compose(tmp_path / "mine.yaml", ["backbone=efficientnet_lite1"])  # not in this folder


def test_custom_config_without_name_defaults(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("detector:\n  batch_size: 3\n")
    experiment = compose(tmp_path)
    assert experiment.name == "default"
    assert experiment.data is None
    assert experiment.detector.batch_size == 3


def test_custom_config_bad_value(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("detector:\n  coreset:\n    ratio: 9\n")
    with pytest.raises(ConfigError) as info:
        compose(tmp_path)
    assert "coreset.ratio" in str(info.value)


def test_custom_config_invalid_yaml(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("detector: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot compose"):
        compose(tmp_path)


def test_custom_config_missing_interpolation(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("name: ${nowhere}\n")
    with pytest.raises(ConfigError, match="cannot compose"):
        compose(tmp_path)


# ---------------------------------------------------------------------- sweeps


def test_expand_sweep_empty() -> None:
    assert expand_sweep([]) == [[]]
    assert expand_sweep([], None) == [[]]
    assert expand_sweep([], {}) == [[]]


def test_expand_sweep_plain_overrides_are_one_run() -> None:
    overrides = ["detector.coreset.ratio=0.1", "name=x"]
    assert expand_sweep(overrides) == [overrides]


def test_expand_sweep_comma() -> None:
    assert expand_sweep(["detector.coreset.ratio=0.01,0.05,0.1"]) == [
        ["detector.coreset.ratio=0.01"],
        ["detector.coreset.ratio=0.05"],
        ["detector.coreset.ratio=0.1"],
    ]


def test_expand_sweep_group_comma() -> None:
    assert expand_sweep(["backbone=efficientnet_lite0,efficientnet_lite1"]) == [
        ["backbone=efficientnet_lite0"],
        ["backbone=efficientnet_lite1"],
    ]


def test_expand_sweep_range_and_choice() -> None:
    assert expand_sweep(["detector.scoring.k=range(1,4)"]) == [
        ["detector.scoring.k=1"],
        ["detector.scoring.k=2"],
        ["detector.scoring.k=3"],
    ]
    assert expand_sweep(["detector.coreset.seed=range(0,6,2)"]) == [
        ["detector.coreset.seed=0"],
        ["detector.coreset.seed=2"],
        ["detector.coreset.seed=4"],
    ]
    assert expand_sweep(["name=choice(a,b)"]) == [["name=a"], ["name=b"]]


def test_expand_sweep_cartesian_product() -> None:
    runs = expand_sweep(
        ["a=1,2,3", "b=range(0,4)", "c=fixed", "backbone=efficientnet_lite0,efficientnet_lite1"]
    )
    assert len(runs) == 3 * 4 * 1 * 2
    assert len({tuple(run) for run in runs}) == len(runs)
    assert all(len(run) == 4 for run in runs)
    assert all(run[2] == "c=fixed" for run in runs)
    # Order follows the command line, first axis slowest.
    assert runs[0] == ["a=1", "b=0", "c=fixed", "backbone=efficientnet_lite0"]
    assert runs[-1] == ["a=3", "b=3", "c=fixed", "backbone=efficientnet_lite1"]


def test_expand_sweep_config_mapping() -> None:
    runs = expand_sweep(
        ["name=s"], {"detector.coreset.ratio": [0.01, 0.1], "detector.coreset.size": [None, 7]}
    )
    assert runs == [
        ["name=s", "detector.coreset.ratio=0.01", "detector.coreset.size=null"],
        ["name=s", "detector.coreset.ratio=0.01", "detector.coreset.size=7"],
        ["name=s", "detector.coreset.ratio=0.1", "detector.coreset.size=null"],
        ["name=s", "detector.coreset.ratio=0.1", "detector.coreset.size=7"],
    ]


def test_expand_sweep_list_values() -> None:
    runs = expand_sweep([], {"detector.features.input_size": [[128, 128], [256, 192]]})
    assert runs == [
        ["detector.features.input_size=[128,128]"],
        ["detector.features.input_size=[256,192]"],
    ]
    # ... and those overrides compose.
    assert compose(overrides=runs[1]).detector.features.input_size == (256, 192)


def test_expand_sweep_command_line_overrides_config_sweep() -> None:
    sweep = {"detector.coreset.ratio": [0.01, 0.02, 0.05, 0.1], "detector.scoring.k": [1, 3]}
    runs = expand_sweep(["detector.coreset.ratio=0.5"], sweep)
    assert runs == [
        ["detector.coreset.ratio=0.5", "detector.scoring.k=1"],
        ["detector.coreset.ratio=0.5", "detector.scoring.k=3"],
    ]
    runs = expand_sweep(["detector.coreset.ratio=0.2,0.3"], sweep)
    assert len(runs) == 2 * 2
    assert {run[0] for run in runs} == {"detector.coreset.ratio=0.2", "detector.coreset.ratio=0.3"}


def test_expand_sweep_with_packaged_sweep_composes() -> None:
    raw = compose(overrides=["experiment=coreset_sweep"]).raw
    runs = expand_sweep(["experiment=coreset_sweep"], raw["sweep"])
    assert len(runs) == 4
    ratios = [compose(overrides=run).detector.coreset.ratio for run in runs]
    assert ratios == [0.01, 0.02, 0.05, 0.1]


@pytest.mark.parametrize("values", [[], 3, "0.1,0.2", None])
def test_expand_sweep_bad_config_values(values: object) -> None:
    message = r"sweep\.detector\.coreset\.ratio must be a non-empty list"
    with pytest.raises(ConfigError, match=message):
        expand_sweep([], {"detector.coreset.ratio": values})


def test_expand_sweep_unparsable_override() -> None:
    with pytest.raises(ConfigError, match="cannot parse overrides"):
        expand_sweep(["a=1,"])


def test_device_argument_beats_the_config() -> None:
    assert compose(overrides=["detector.device=cpu"], device="cuda:1").detector.device == "cuda:1"
    assert compose(overrides=["detector.device=cpu"]).detector.device == "cpu"


def test_plan_runs_one_run_or_a_sweep() -> None:
    one = ["detector.coreset.ratio=0.1", "detector.features.input_size=[128,128]"]
    assert plan_runs(None, one, multirun=False) == [one]  # a bracketed list is one value
    sweep = ["detector.coreset.ratio=0.1,0.2"]
    with pytest.raises(ConfigError, match="--multirun"):
        plan_runs(None, sweep, multirun=False)
    assert plan_runs(None, sweep, multirun=True) == [
        ["detector.coreset.ratio=0.1"],
        ["detector.coreset.ratio=0.2"],
    ]
