import pytest

from pipeline.__main__ import check_group_choices
from pipeline.errors import ConfigError
from pipeline.run import load_settings


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "pruner.type=magnitude",
            "pruner.type='magnitude' is not allowed; allowed values: apoz, mean_rank",
        ),
        (
            "pruner.mode=greedy",
            "pruner.mode='greedy' is not allowed; allowed values: normal, dependency_aware",
        ),
        (
            "pruner.activation=tanh",
            "pruner.activation='tanh' is not allowed; allowed values: relu, relu6, gelu",
        ),
        ("sparsity=1.2", "sparsity=1.2 is not allowed; allowed values: a number in (0, 1)"),
        ("sparsity=0", "sparsity=0 is not allowed; allowed values: a number in (0, 1)"),
        (
            "pruner.confidence=1",
            "pruner.confidence=1 is not allowed; allowed values: an integer > 1",
        ),
        ("device=tpu", "device='tpu' is not allowed; allowed values: auto, cpu, cuda"),
        (
            "pruner.iterations=0",
            "pruner.iterations=0 is not allowed; allowed values: an integer >= 1",
        ),
        (
            "pruner.recalibration_batches=-1",
            "pruner.recalibration_batches=-1 is not allowed; allowed values: an integer >= 0",
        ),
    ],
)
def test_bad_settings_fail_with_one_line_naming_key_and_allowed_values(
    tiny_config, override, expected
):
    with pytest.raises(ConfigError) as caught:
        load_settings(tiny_config(override))
    assert str(caught.value) == expected


def test_good_settings_come_back_typed(tiny_config):
    settings = load_settings(tiny_config("pruner=apoz", "pruner.activation=relu6", "sparsity=0.3"))
    assert settings.pruner.type == "apoz"
    assert settings.pruner.activation == "relu6"
    assert settings.sparsity == 0.3
    assert settings.finetune.epochs == 1


def test_unknown_group_choice_is_rejected_before_composition():
    with pytest.raises(
        ConfigError, match=r"pruner='magnitude' is not allowed; allowed values: apoz, mean_rank$"
    ):
        check_group_choices(["pruner=magnitude"])
    with pytest.raises(ConfigError, match="dataset='mnist'"):
        check_group_choices(["-m", "dataset=digits,mnist"])
    check_group_choices(["pruner=apoz", "sparsity=0.3", "experiment=null"])


@pytest.mark.parametrize("experiment", ["pets_reference", "fashion_mnist"])
def test_experiment_presets_compose_and_validate(tiny_config, experiment):
    settings = load_settings(tiny_config(f"experiment={experiment}"))
    assert settings.dataset["num_classes"] in (10, 37)
    if experiment == "pets_reference":
        assert settings.dataset["split"] == "reference"
        assert settings.model["weights"] == "imagenet"
        assert settings.model["num_classes"] == 37
        assert settings.baseline.lr == 0.01  # the preset wins over conf/config.yaml
