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


@pytest.mark.parametrize("runtime", ["eager", "jit_freeze"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_lower_precision_form_gives_float32_logits_close_to_fp32(
    trained_looking_model, runtime, precision
):
    inputs = torch.randn(4, 3, 32, 32)
    form = inference_model(trained_looking_model, (3, 32, 32), runtime, precision=precision)
    with torch.inference_mode():
        reference = trained_looking_model(inputs)
        logits = form(inputs)
    assert logits.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa, fp16 11: a few percent of the logits' scale at most.
    scale = reference.abs().max().item()
    torch.testing.assert_close(logits, reference, rtol=0.05, atol=0.05 * scale)
    assert not torch.equal(logits, reference)  # it did run in the lower precision
    weights = [p.dtype for p in trained_looking_model.parameters()]
    assert set(weights) == {torch.float32}  # the original is untouched


def test_onnxruntime_is_refused_a_precision_its_fp32_export_cannot_run(trained_looking_model):
    with pytest.raises(ValueError, match="measure.precision=bf16 cannot run with"):
        inference_model(trained_looking_model, (3, 32, 32), "onnxruntime", precision="bf16")


def test_quality_evaluates_the_form_in_the_precision_that_is_timed(tiny):
    from conftest import digits_inputs
    from pipeline.stages.measure import quality
    from pipeline.training.loop import evaluate

    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10).eval()
    inputs = digits_inputs(max_batches=2)
    loader = inputs.loaders.test
    full = quality(model, loader, inputs, tiny().measure)
    settings = tiny("measure.precision=bf16").measure
    half = quality(model, loader, inputs, settings)
    form = inference_model(model, (3, 32, 32), precision="bf16")
    expected = evaluate(form, loader, inputs.criterion, inputs.device)
    assert half["predicted"] == expected.predicted
    assert half["loss"] == pytest.approx(expected.loss)
    assert half["loss"] != full["loss"]
    # Size and MACs are the fp32 model's, whatever format it is evaluated in.
    assert {k: half[k] for k in ("params", "macs", "size_bytes")} == {
        k: full[k] for k in ("params", "macs", "size_bytes")
    }


@pytest.mark.parametrize("runtime", ["eager", "jit_freeze"])
def test_the_bytes_a_form_holds_are_its_weights_in_their_format(trained_looking_model, runtime):
    from pipeline.stages.measure import held_bytes

    folded = sum(
        p.numel()
        for m in trained_looking_model.modules()
        if not isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters(recurse=False)
    )
    convs = sum(  # a folded convolution gains a bias per output channel
        m.out_channels
        for m in trained_looking_model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.bias is None
    )
    for precision, size in (("fp32", 4), ("bf16", 2)):
        form = inference_model(trained_looking_model, (3, 32, 32), runtime, precision=precision)
        assert held_bytes(form) == (folded + convs) * size
