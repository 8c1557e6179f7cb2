"""Property: whatever mix of overrides a user types, checking the command line ends either in a
run plan (typed settings for every job) or in one ConfigError line, never in another exception.

Hypothesis draws the mixes from values that are right, wrong in type, out of range, misspelt or
malformed; the examples are bounded and derandomised so that CI runs the same ones every time."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.checks.sweep_plan import check_command_line
from pipeline.errors import ConfigError

CONFIG_LISTS = [
    "[{sparsity:0.3,op_types:[Conv2d]}]",
    "[{op_types:[Conv2d]}]",
    "[{sparsity:0.3,op_types:[Conv9d]}]",
    "[{sparsity:0.3,op_names:[features.0.0]}]",
    "[{sparsity:0.3,op_names:[nolayer]}]",
    "[{total_sparsity:0.2,sparsity:0.2}]",
    "[{sparsity:2}]",
    "[{exclude:true,op_names:[classifier.9]}]",
    "[{sparsity:0.2,colour:red}]",
    "[1,2]",
    "[]",
    "notalist",
    "null",
]

VALUES = {
    "sparsity": ["0.15", "0.5", "0", "1", "-0.2", "1.5", "abc", "null", "[1,2]", "${oops}"],
    "pruner": ["apoz", "mean_rank", "magnitude", "''"],
    "pruner.mode": ["normal", "dependency_aware", "greedy", "1"],
    "pruner.activation": ["relu", "relu6", "gelu", "abs", "tanh"],
    "pruner.confidence": ["2", "8", "1", "0", "-3", "x", "2.5"],
    "pruner.iterations": ["1", "4", "0", "-1"],
    "pruner.round_to": ["null", "16", "0", "a"],
    "pruner.trace_input_size": ["null", "64", "4"],
    "pruner.config_list": CONFIG_LISTS,
    "pruner.sparsity_scale": [
        "[]",
        "[{layers:classifier.*,factor:1.5}]",
        "[{layers:nolayer,factor:2}]",
        "[{layers:classifier.*,factor:-1}]",
        "[{factor:2}]",
        "{a:1}",
    ],
    "pruner.lrr": ["0.1"],
    "finetune.epochs": ["0", "3", "-1", "x"],
    "finetune.between_steps": ["0", "1", "-1"],
    "finetune.dropout": ["keep", "scaled", "halved"],
    "finetune.ema_decay": ["0", "0.998", "1", "-0.5", "x"],
    "finetune.optimizer._target_": ["torch.optim.Adam", "torch.optim.Nope", "nope.Opt", "os.path"],
    "criterion._target_": ["torch.nn.CrossEntropyLoss", "nope.Loss", "torch.nn"],
    "baseline.lr": ["0.01", "abc", "null"],
    "baseline.checkpoint": ["null", "/nonexistent/weights.pt"],
    "dataset": ["digits", "imagefolder", "fashion_mnist", "mnist"],
    "dataset.root": ["/nonexistent/dir", "IMAGE_TREE"],
    "dataset.num_classes": ["3", "10", "0"],
    "measure.repeats": ["1", "0", "200"],
    "measure.runtime": ["eager", "jit_freeze", "onnxruntime", "compile", "tensorrt"],
    "device": ["cpu", "auto", "cuda", "tpu"],
    "tracking": ["none", "mlflow", "wandb"],
    "max_batches": ["null", "2", "0"],
    "seed": ["0", "1234", "-1", "x"],
}
OVERRIDES = [f"{key}={value}" for key, values in VALUES.items() for value in values]
OVERRIDES += ["~sparsity", "+extra=1", "sparsity", "=0.3", "pruner=apoz,mean_rank"]


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name in ("cat", "dog", "owl"):
        (root / name).mkdir()
        (root / name / "0.png").write_bytes(b"")
    return root


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chosen=st.lists(st.sampled_from(OVERRIDES), min_size=1, max_size=5))
def test_any_mix_of_overrides_is_a_plan_or_one_line(chosen, image_tree):
    overrides = [arg.replace("IMAGE_TREE", str(image_tree)) for arg in chosen]
    if any("," in arg for arg in overrides):
        overrides = ["-m", *overrides]
    try:
        check_command_line([*overrides, "tracking.uri=null"])
    except ConfigError as error:
        message = str(error)
        assert message.strip() and "\n" not in message, (overrides, message)
        event("one-line error")
    else:
        event("run plan")
