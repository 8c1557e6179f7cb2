import pytest

from pipeline.checks.sweep_plan import check_command_line
from pipeline.config.schema import Activation
from pipeline.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "pruner=magnitude",
            "pruner='magnitude' is not allowed; allowed values: apoz, fpgm, l1_norm, l2_norm, "
            "mean_rank, taylor, tp_activation, tp_lamp, tp_magnitude, tp_taylor",
        ),
        ("baseline.epochs=x", "baseline.epochs='x' is not allowed; allowed values: an integer"),
        (
            "finetune.optimizer._target_=torch.optim.Nope",
            "finetune.optimizer._target_='torch.optim.Nope' is not allowed; allowed values: an "
            "importable class or function (torch.optim has no Nope)",
        ),
        (
            "criterion._target_=nope.Loss",
            "criterion._target_='nope.Loss' is not allowed; allowed values: an importable class "
            "or function ('nope.Loss' names no module)",
        ),
        (
            "pruner.config_list=[{op_types:[Conv2d]}]",
            "pruner.config_list[0]={'op_types': ['Conv2d']} is not allowed; allowed values: "
            "exactly one of sparsity, sparsity_per_layer, total_sparsity (or exclude: true)",
        ),
        (
            "pruner.config_list=[{sparsity:0.3,op_types:[Conv9d]}]",
            "pruner.config_list[0].op_types='Conv9d' is not allowed; allowed values: torch.nn "
            "layer class names such as Conv2d, Linear",
        ),
        (
            "pruner.config_list=[{sparsity:1.3}]",
            "pruner.config_list[0].sparsity=1.3 is not allowed; allowed values: a number in (0, 1)",
        ),
        (
            "pruner.mode=greedy",
            "pruner.mode='greedy' is not allowed; allowed values: normal, dependency_aware",
        ),
        (
            "pruner.activation=tanh",
            "pruner.activation='tanh' is not allowed; allowed values: relu, relu6, gelu, abs",
        ),
        ("sparsity=1.2", "sparsity=1.2 is not allowed; allowed values: a number in (0, 1)"),
        ("sparsity=0", "sparsity=0.0 is not allowed; allowed values: a number in (0, 1)"),
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
            "pruner.sparsity_scale=[{layers:classifier.*,factor:-1}]",
            "pruner.sparsity_scale='<given value>' is not allowed; allowed values: a list of "
            "{layers: <fnmatch pattern>, factor: <number >= 0>}, e.g. "
            "[{layers: 'classifier.*', factor: 1.5}]",
        ),
        (
            "measure.batch_sizes=[1,1]",
            "measure.batch_sizes='<given value>' is not allowed; allowed values: null (the "
            "device's default: [1] on the CPU, [1, 8, 64] on CUDA) or a list of distinct integers "
            ">= 1, e.g. [1, 8, 64]",
        ),
        (
            "measure.batch_sizes=[0,8]",
            "measure.batch_sizes='<given value>' is not allowed; allowed values: null (the "
            "device's default: [1] on the CPU, [1, 8, 64] on CUDA) or a list of distinct integers "
            ">= 1, e.g. [1, 8, 64]",
        ),
        (
            "measure.precision=int8",
            "measure.precision='int8' is not allowed; allowed values: fp32, bf16, fp16",
        ),
        (
            "measure.runtime=onnxruntime measure.precision=bf16",
            "measure.precision=bf16 cannot run with measure.runtime=onnxruntime, whose export is "
            "fp32; allowed values: measure.precision=fp32 with it, or "
            "measure.runtime=eager|jit_freeze|compile|cudagraphs|tensorrt with bf16",
        ),
        (
            "pruner.recalibration_batches=-1",
            "pruner.recalibration_batches=-1 is not allowed; allowed values: an integer >= 0",
        ),
    ],
)
def test_bad_settings_fail_with_one_line_naming_key_and_allowed_values(tiny, override, expected):
    with pytest.raises(ConfigError) as caught:
        tiny(*override.split())
    assert str(caught.value) == expected


def test_a_missing_mandatory_value_names_the_key(tiny):
    with pytest.raises(ConfigError) as caught:
        tiny("dataset=imagefolder")
    assert str(caught.value) == (
        "dataset.root is required and has no value; set it, e.g. dataset.root=..."
    )


def test_a_mistyped_key_lists_the_keys_that_exist(tiny, tiny_config):
    """A typo is answered with the keys of its section, so the user can see the right one."""
    with pytest.raises(ConfigError) as caught:
        tiny("pruner.lrr=0.1")
    line = str(caught.value)
    assert line.startswith("pruner.lrr is not a setting; allowed keys: ") and "\n" not in line
    listed = line.split("allowed keys: ")[1].split(", ")
    assert "lr" in listed
    assert set(listed) == set(tiny_config().pruner)  # the keys the pruner section has


def test_command_line_values_come_back_as_the_types_the_stages_use(tiny):
    """Hydra reads `1` and `0.3` as text-like values; the stages get the schema's types, and a
    choice comes back as its enum, whatever way it was written."""
    settings = tiny("pruner=apoz", "pruner.activation=relu6", "sparsity=0.3", "baseline.lr=1")
    assert isinstance(settings.baseline.lr, float) and settings.baseline.lr == 1.0
    assert isinstance(settings.pruner.iterations, int)
    assert settings.pruner.activation == Activation.relu6
    assert settings.pruner._target_.endswith(".ActivationAPoZRankPruner")


def test_every_job_of_a_command_line_is_checked_before_any_runs():
    with pytest.raises(
        ConfigError,
        match=r"pruner='magnitude' is not allowed; allowed values: apoz, fpgm, .*, tp_taylor$",
    ):
        check_command_line(["pruner=magnitude"])
    # A sweep's bad jobs are named before any runs (they will fail alone, the others run) ...
    (error,) = check_command_line(["-m", "dataset=digits,mnist"])
    assert "dataset='mnist'" in str(error)
    (error,) = check_command_line(["-m", "sparsity=0.1,1.5"])  # the second value is checked too
    assert str(error).startswith("sparsity=1.5 is not allowed")
    (error,) = check_command_line(["-m", "sparsity=range(0.5,1.1,0.5)"])
    assert str(error).startswith("sparsity=1.0 is not allowed")
    # ... and a sweep none of whose jobs can run is rejected as a whole.
    with pytest.raises(ConfigError, match=r"sparsity=1.5 is not allowed"):
        check_command_line(["-m", "sparsity=1.5,2.5", "pruner=apoz,mean_rank"])
    check_command_line(["pruner=apoz", "sparsity=0.3", "--cfg", "job"])
    check_command_line(
        ["-m", "sparsity=0.05,0.15", "pruner=apoz,mean_rank", "hydra.job.chdir=false"]
    )


@pytest.mark.parametrize("experiment", ["pets_reference", "fashion_mnist"])
def test_experiment_presets_compose_and_validate(tiny, experiment):
    settings = tiny(f"experiment={experiment}")
    assert settings.dataset["num_classes"] in (10, 37)
    if experiment == "pets_reference":
        assert settings.dataset["split"] == "reference"
        assert settings.model["weights"] == "imagenet"
        assert settings.model["num_classes"] == 37
        assert settings.baseline.lr == 0.01  # the preset wins over conf/config.yaml
