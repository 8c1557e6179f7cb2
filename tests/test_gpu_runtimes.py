"""The GPU runtimes and the GPU side of the measure stage (issue 38): each runtime computes the
eager model's function on CUDA; a CUDA run times each batch size with its peak memory and
records the runtime that ran. Run with `pytest -m gpu` on a machine with a CUDA device."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from pipeline.measure.runtime_forms import inference_model, runtime_versions
from pipeline.models.zoo import mobilenet_v2
from pipeline.run import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def has_cuda_onnxruntime() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


RUNTIMES = [
    "eager",
    "compile",
    "cudagraphs",
    pytest.param(
        "tensorrt",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("torch_tensorrt") is None, reason=".[tensorrt] not installed"
        ),
    ),
    pytest.param(
        "onnxruntime",
        marks=pytest.mark.skipif(not has_cuda_onnxruntime(), reason="no onnxruntime-gpu"),
    ),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_each_gpu_runtime_computes_the_eager_function(runtime, precision):
    if runtime == "onnxruntime" and precision != "fp32":
        pytest.skip("onnxruntime's export is fp32")
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10).eval().cuda()
    inputs = torch.randn(8, 3, 32, 32, device="cuda")
    form = inference_model(model, (3, 32, 32), runtime, batch_sizes=(8,), precision=precision)
    with torch.inference_mode():
        reference = model(inputs)
        logits = form(inputs).clone()  # a CUDA graph's output is overwritten by its next replay
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"
    scale = reference.abs().max().item()
    tolerance = 1e-3 if precision == "fp32" else 0.05
    torch.testing.assert_close(logits, reference, rtol=tolerance, atol=tolerance * scale)
    if runtime == "onnxruntime":
        assert runtime_versions(form)["provider"] == "CUDAExecutionProvider"


def test_a_cuda_run_times_each_batch_size_with_its_peak_memory(tiny, tmp_path):
    settings = tiny("device=cuda", "tracking=none", "measure.batch_sizes=[1,8,64]")
    record = run(settings, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "measurements.json").read_text())
    assert record["device"] == "cuda"
    rows = saved["latency_by_batch"]
    assert [row["batch_size"] for row in rows] == [1, 8, 64]
    for row in rows:
        memory = row["peak_memory_mb"]
        assert 0 < memory["pruned"] < memory["baseline"], row
    # A larger batch holds more activations.
    assert rows[2]["peak_memory_mb"]["baseline"] > rows[0]["peak_memory_mb"]["baseline"]
