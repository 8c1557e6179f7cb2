import functools

import pytest
import torch

from pipeline.measure.runtime_forms import inference_model
from pipeline.models.zoo import mobilenet_v2


@pytest.fixture
def trained_looking_model():
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10).eval()
    for module in model.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    return model


@functools.cache
def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (it builds C++ kernels on the CPU), or None."""
    try:
        torch.compile(torch.nn.Linear(2, 2))(torch.zeros(1, 2))
    except Exception as error:  # a missing compiler surfaces as one of several error types
        return f"torch.compile does not work here: {type(error).__name__}: {error}"[:300]
    return None


def needs_compile():
    reason = compile_unavailable()
    if reason is not None:
        pytest.skip(reason)


RUNTIME_PARAMS = [
    "eager",
    "jit_freeze",
    "onnxruntime",
    # One compile of MobileNetV2 takes ~20 s on a small CPU.
    pytest.param("compile", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_form_computes_the_same_function(trained_looking_model, runtime, channels_last):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the .[runtimes] extra is not installed")
    if runtime == "compile":
        needs_compile()
    inputs = torch.randn(2, 3, 32, 32)
    prepared = inference_model(
        trained_looking_model, (3, 32, 32), runtime, True, channels_last, batch_sizes=(2,)
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    inputs_in = inputs.contiguous(memory_format=layout)
    # inference_mode, as in every timing (torch.compile's graphs are guarded on it).
    with torch.inference_mode():
        torch.testing.assert_close(prepared(inputs_in), trained_looking_model(inputs))


def test_batchnorm_is_folded_and_the_original_kept(trained_looking_model):
    prepared = inference_model(trained_looking_model, (3, 32, 32))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trained_looking_model.modules())
