import pytest
import torch

from pipeline.inference import inference_model
from pipeline.models import mobilenet_v2


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


@pytest.mark.parametrize("runtime", ["eager", "jit_freeze"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_form_computes_the_same_function(trained_looking_model, runtime, channels_last):
    inputs = torch.randn(2, 3, 32, 32)
    prepared = inference_model(trained_looking_model, (3, 32, 32), runtime, True, channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    inputs_in = inputs.contiguous(memory_format=layout)
    with torch.no_grad():
        torch.testing.assert_close(prepared(inputs_in), trained_looking_model(inputs))


def test_batchnorm_is_folded_and_the_original_kept(trained_looking_model):
    prepared = inference_model(trained_looking_model, (3, 32, 32))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trained_looking_model.modules())
