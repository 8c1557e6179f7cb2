"""measure.runtime=onnxruntime and measure.runtime=compile: whole runs, compilation kept out of
the timed calls, the missing-extra line, and the per-layer-kind profile of benchmarks/latency.py."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from torch import nn

from conftest import ROOT, run_cli
from pipeline.checks.sweep_plan import check_command_line
from pipeline.errors import ConfigError, RuntimeUnavailableError
from pipeline.measure.runtime_forms import inference_model
from pipeline.models.layer_profile import KINDS, layer_kind, macs_by_kind, profile_by_kind
from pipeline.models.stats import count_macs
from pipeline.models.zoo import mobilenet_v2
from pipeline.run import run
from test_inference import needs_compile

MISSING_LINE = (
    "measure.runtime=onnxruntime needs the onnxruntime package, which is not installed: pip "
    'install -e ".[runtimes]" (or choose another measure.runtime)'
)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "compile"])
def test_a_whole_run_times_both_models_in_the_runtime(tiny, tmp_path, runtime):
    if runtime == "onnxruntime":
        onnxruntime = pytest.importorskip("onnxruntime", reason=".[runtimes] is not installed")
    else:
        needs_compile()
    run(tiny(f"measure.runtime={runtime}", "tracking=none"), tmp_path / "run")

    saved = json.loads((tmp_path / "run" / "measurements.json").read_text())
    for side in ("baseline", "pruned"):
        form = saved[side]["runtime"]
        assert form["name"] == runtime, form
        assert form["torch"] == torch.__version__
        assert saved[side]["latency_ms"]["p50"] > 0
        assert saved[side]["throughput"] > 0
        if runtime == "onnxruntime":
            assert form["onnxruntime"] == onnxruntime.__version__
            assert form["provider"] == "CPUExecutionProvider"
    assert saved["latency_ratio"]["ratio"] > 0


def test_onnxruntime_form_takes_any_batch_and_the_thread_count():
    onnxruntime = pytest.importorskip("onnxruntime", reason=".[runtimes] is not installed")
    model = small_model()
    form = inference_model(model, (3, 8, 8), "onnxruntime", threads=1)
    assert form.session.get_session_options().intra_op_num_threads == 1
    assert form.session.get_session_options().graph_optimization_level == (
        onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    with torch.inference_mode():
        for batch in (1, 5):
            images = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(form(images), model(images))


def test_compiled_form_never_compiles_in_a_timed_call():
    needs_compile()
    torch.compiler.reset()
    model = small_model()
    form = inference_model(model, (3, 8, 8), "compile", batch_sizes=(1, 16))
    # Any compilation from here on raises: the batch sizes asked for were compiled up front.
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for batch in (1, 16, 1):
            images = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(form(images), model(images))


def test_missing_onnxruntime_is_one_line_naming_the_key_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(RuntimeUnavailableError) as raised:
        inference_model(small_model(), (3, 8, 8), "onnxruntime")
    assert str(raised.value) == MISSING_LINE
    # The pre-flight check reports it before any work, as a setting that cannot be used.
    with pytest.raises(ConfigError) as raised:
        check_command_line(["measure.runtime=onnxruntime", "tracking.uri=null"])
    assert str(raised.value) == MISSING_LINE


@pytest.mark.slow
def test_missing_onnxruntime_stops_the_command_before_training(tmp_path, monkeypatch):
    shadow = tmp_path / "shadow"  # an onnxruntime that fails to import, ahead of the real one
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ImportError('simulated: not installed')\n")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))
    )
    result = run_cli(
        "measure.runtime=onnxruntime", f"paths.output_root={tmp_path / 'outputs'}", cwd=ROOT
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {MISSING_LINE}"
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "outputs").glob("**/measurements.json"))
    assert not list((tmp_path / "outputs").glob("cache/**/*.safetensors"))


@pytest.mark.parametrize("runtime", ["cudagraphs", "tensorrt"])
def test_a_gpu_runtime_is_refused_on_the_cpu_before_any_work(runtime):
    with pytest.raises(ConfigError) as raised:
        check_command_line([f"measure.runtime={runtime}", "device=cpu", "tracking.uri=null"])
    assert str(raised.value) == (
        f"measure.runtime={runtime} runs on a CUDA GPU, and this run measures on cpu; allowed "
        f"values: measure.runtime=eager|jit_freeze|onnxruntime|compile here, or {runtime} with "
        f"device=cuda on a machine with a GPU"
    )


def test_tensorrt_without_its_extra_names_the_extra(monkeypatch):
    from pipeline.measure.runtime_forms import require_runtime

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails
    with pytest.raises(RuntimeUnavailableError) as raised:
        require_runtime("tensorrt", "cuda")
    assert str(raised.value) == (
        "measure.runtime=tensorrt needs the torch_tensorrt package, which is not installed: pip "
        'install -e ".[tensorrt]" (or choose another measure.runtime)'
    )


def test_onnxruntime_on_cuda_without_its_cuda_provider_is_refused_not_timed_on_the_cpu():
    """Before any work when the installed onnxruntime has no CUDA provider; after the session
    opens when the provider was there but did not load (onnxruntime then runs on the CPU and
    only logs it)."""
    from pipeline.measure.runtime_forms import check_provider_ran, onnxruntime_providers

    assert onnxruntime_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnxruntime_providers("cuda", ["TensorrtExecutionProvider", *both]) == both
    with pytest.raises(RuntimeUnavailableError) as raised:
        onnxruntime_providers("cuda", ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert str(raised.value) == (
        "measure.runtime=onnxruntime on cuda needs onnxruntime's CUDAExecutionProvider, and the "
        "installed onnxruntime has AzureExecutionProvider, CPUExecutionProvider: pip install "
        "onnxruntime-gpu instead of onnxruntime (or device=cpu)"
    )
    check_provider_ran("cuda", both)
    check_provider_ran("cpu", ["CPUExecutionProvider"])
    with pytest.raises(RuntimeUnavailableError, match="fell back to CPUExecutionProvider"):
        check_provider_ran("cuda", ["CPUExecutionProvider"])


def test_layer_kinds_of_mobilenet_v2():
    model = mobilenet_v2(num_classes=10)
    counts: dict[str, int] = {}
    for module in model.modules():
        if next(module.children(), None) is None:
            counts[layer_kind(module)] = counts.get(layer_kind(module), 0) + 1
    # 17 inverted residual blocks: each has one depthwise 3x3 conv and a 1x1 projection, all
    # but the first a 1x1 expansion; then the last 1x1 conv to 1280 channels; the stem is a
    # strided 3x3 conv over the 3 input channels.
    assert counts["depthwise conv"] == 17
    assert counts["pointwise conv"] == 17 + 16 + 1
    assert counts["other conv"] == 1
    assert counts["batchnorm"] == 17 + 17 + 16 + 1 + 1
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert counts["linear"] == linears >= 1
    assert layer_kind(nn.Conv2d(8, 8, 1, groups=8)) == "depthwise conv"
    assert layer_kind(nn.Conv2d(8, 16, 1, groups=2)) == "other conv"
    assert layer_kind(nn.ReLU6()) == "other"


def test_profile_by_kind_splits_the_whole_pass_and_macs_add_up():
    model = mobilenet_v2(num_classes=10).eval()
    shape = (3, 32, 32)
    times = profile_by_kind(model, shape, repeats=3, warmup=1)
    assert set(times) == set(KINDS)
    for kind in ("pointwise conv", "depthwise conv", "other conv", "linear", "batchnorm"):
        assert times[kind] > 0, (kind, times)
    # The layers of named kinds take most of the pass; `other` is the rest of it.
    assert 0 <= times["other"] < sum(times.values()) * 0.5, times
    macs = macs_by_kind(model, shape)
    assert sum(macs.values()) == count_macs(model, shape)
    assert macs["pointwise conv"] > macs["depthwise conv"] > 0
    assert macs["batchnorm"] == macs["other"] == 0


@pytest.mark.slow  # a timing comparison: kept out of the fast tier, where other work skews it
def test_profiled_kinds_sum_close_to_an_unprofiled_pass():
    """The per-kind times add up to about what the pass takes without the profiler (which
    adds its own cost per op, hence the generous bound). Three profiled and unprofiled blocks
    back to back, and the median of their ratios: a load spike during one block moves one ratio,
    not the median."""
    model = mobilenet_v2(num_classes=10).eval()
    shape = (3, 32, 32)
    batch = torch.randn(1, *shape)
    ratios = []
    for _ in range(3):
        times = profile_by_kind(model, shape, repeats=5, warmup=2)
        with torch.inference_mode():
            began = time.perf_counter()
            for _ in range(5):
                model(batch)
            plain_ms = (time.perf_counter() - began) * 1000 / 5
        ratios.append(sum(times.values()) / plain_ms)
    assert 0.5 < sorted(ratios)[1] < 4, ratios
