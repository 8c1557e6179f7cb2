"""The inference form of a model, used for every timing: the baseline and the pruned model get
the same treatment so that their latency ratio compares architectures, not runtimes."""

from __future__ import annotations

import copy
import importlib
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.config.schema import InferencePrecision, Runtime
from pipeline.errors import RuntimeUnavailableError

RUNTIMES = tuple(runtime.value for runtime in Runtime)
# What a runtime imports beyond torch, and the extra that installs it (the ONNX exporter needs
# onnx too; onnxruntime-gpu, installed instead of onnxruntime, provides the same module).
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "tensorrt": ("torch_tensorrt",)}
RUNTIME_EXTRAS = {"onnxruntime": "runtimes", "tensorrt": "tensorrt"}
# Runtimes that only exist on a GPU: timing them elsewhere would time something else.
CUDA_ONLY_RUNTIMES = ("cudagraphs", "tensorrt")
PRECISIONS = tuple(precision.value for precision in InferencePrecision)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Runtimes that run only the fp32 graph they export (their own precision options are their own).
FP32_ONLY_RUNTIMES = ("onnxruntime",)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d into the Conv2d just before it in a Sequential (eval-mode maths).

    Inference then skips one pass over every activation map; outputs are unchanged up to
    float rounding. Modifies `model` in place and returns it.
    """
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return model


class CastModel(nn.Module):
    """A model whose weights are cast to a lower precision, run on inputs cast to it, giving
    float32 logits: how a deployment feeds an fp32 camera batch to a bf16 or fp16 network.
    The two casts are part of every timed call, for the baseline and the pruned model alike."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.dtype)).float()


def check_precision(runtime: str, precision: str) -> None:
    """ValueError when `runtime` cannot run `precision`: onnxruntime's export is fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    if precision != "fp32" and runtime in FP32_ONLY_RUNTIMES:
        allowed = ", ".join(r for r in RUNTIMES if r not in FP32_ONLY_RUNTIMES)
        raise ValueError(
            f"measure.precision={precision} cannot run with measure.runtime={runtime}, whose "
            f"export is fp32; allowed values: measure.precision=fp32 with it, or "
            f"measure.runtime={allowed.replace(', ', '|')} with {precision}"
        )


def require_runtime(runtime: str, device: str | None = None) -> None:
    """RuntimeUnavailableError, one line naming the setting and the extra, when a package the
    runtime needs is not installed, or the runtime cannot run on `device` (cpu, cuda; None:
    not checked); checked before any work (pipeline.checks.preflight)."""
    if device is not None and device != "cuda" and runtime in CUDA_ONLY_RUNTIMES:
        on_cpu = ", ".join(r for r in RUNTIMES if r not in CUDA_ONLY_RUNTIMES)
        raise RuntimeUnavailableError(
            f"measure.runtime={runtime} runs on a CUDA GPU, and this run measures on {device}; "
            f"allowed values: measure.runtime={on_cpu.replace(', ', '|')} here, or "
            f"{runtime} with device=cuda on a machine with a GPU"
        )
    for package in RUNTIME_PACKAGES.get(runtime, ()):
        try:
            importlib.import_module(package)
        except ImportError:
            raise RuntimeUnavailableError(
                f"measure.runtime={runtime} needs the {package} package, which is not "
                f'installed: pip install -e ".[{RUNTIME_EXTRAS[runtime]}]" (or choose another '
                f"measure.runtime)"
            ) from None
    if runtime == "onnxruntime" and device == "cuda":
        onnxruntime_providers("cuda", _available_providers())


def onnxruntime_providers(device: str, available: list[str]) -> list:
    """The execution providers to ask onnxruntime for on `device`: on CUDA its CUDA provider,
    which must be there (RuntimeUnavailableError otherwise: timing the CPU provider on a GPU
    run would report CPU timings as GPU timings)."""
    if device != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeUnavailableError(
            f"measure.runtime=onnxruntime on cuda needs onnxruntime's CUDAExecutionProvider, "
            f"and the installed onnxruntime has {', '.join(available)}: pip install "
            f"onnxruntime-gpu instead of onnxruntime (or device=cpu)"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def inference_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    runtime: str = "eager",
    fold_bn: bool = True,
    channels_last: bool = False,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (1,),
    precision: str = "fp32",
) -> nn.Module:
    """A copy of `model` prepared for timing; the original is left untouched. `threads`: the
    onnxruntime session's intra-op threads (None: its default); torch forms take theirs from
    the caller (pipeline.measure.latency.cpu_threads). `batch_sizes`: those it will be timed
    at, which the compile runtime compiles for now. `precision`: fp32, or bf16/fp16 for a
    CastModel (BatchNorm folded in fp32 first, as a deployment's converter does)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: allowed {', '.join(RUNTIMES)}")
    check_precision(runtime, precision)
    require_runtime(runtime)
    prepared = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if precision != "fp32":
        prepared = CastModel(prepared, DTYPES[precision])
    if runtime == "jit_freeze":
        with torch.no_grad():
            example = _example(prepared, input_shape, channels_last)
            prepared = torch.jit.freeze(torch.jit.trace(prepared, example).eval())
    elif runtime == "onnxruntime":
        prepared = OnnxRuntimeModel.export(prepared, _example(prepared, input_shape), threads)
    elif runtime == "tensorrt":
        prepared = _tensorrt(prepared, input_shape, batch_sizes, precision, channels_last)
    elif runtime in ("compile", "cudagraphs"):
        # One static graph per batch size, compiled now so that no timed call compiles. A
        # dynamic batch dimension would not spare that: its graph is guarded to a range of sizes
        # (2 to 15 for MobileNetV2 on the CPU) and a larger batch compiles again. Under
        # inference_mode, as every timing runs: grad mode is part of the guards.
        # cudagraphs: the same, with each graph's kernels recorded once as a CUDA graph and
        # replayed as one launch (mode="reduce-overhead"); a graph is recorded on its first
        # calls, so a few are made here.
        mode = "reduce-overhead" if runtime == "cudagraphs" else None
        prepared = torch.compile(prepared, dynamic=False, mode=mode)
        calls = 3 if runtime == "cudagraphs" else 1
        with torch.inference_mode():
            for batch in dict.fromkeys(batch_sizes):
                for _ in range(calls):
                    prepared(_example(prepared, input_shape, channels_last, batch))
    return prepared


class PerBatchSize(nn.Module):
    """One compiled form per batch size (a TensorRT engine is built for fixed shapes), chosen
    by the batch's size."""

    def __init__(self, forms: dict[int, nn.Module]) -> None:
        super().__init__()
        self.forms = forms  # not a ModuleDict: engines are not modules to move or save

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        form = self.forms.get(images.shape[0])
        if form is None:
            raise ValueError(
                f"a TensorRT form was built for batch sizes {sorted(self.forms)}, "
                f"not {images.shape[0]}"
            )
        return form(images)


def _tensorrt(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...],
    precision: str,
    channels_last: bool,
) -> nn.Module:
    """Torch-TensorRT's dynamo path: one engine per batch size, the weights in `precision` (its
    own enabled_precisions: the model handed in is fp32 or a CastModel, whose casts TensorRT
    folds into the engine)."""
    import torch_tensorrt

    forms = {}
    for batch in dict.fromkeys(batch_sizes):
        example = _example(model, input_shape, channels_last, batch)
        forms[batch] = torch_tensorrt.compile(
            model,
            ir="dynamo",
            inputs=[example],
            enabled_precisions={DTYPES[precision]},
        )
    return PerBatchSize(forms)


def runtime_versions(form: nn.Module) -> dict[str, str]:
    """The versions (and the onnxruntime provider) that ran a prepared form, for measurements."""
    versions = {"torch": torch.__version__}
    if isinstance(form, PerBatchSize):
        import torch_tensorrt

        versions["torch_tensorrt"] = torch_tensorrt.__version__
    if isinstance(form, OnnxRuntimeModel):
        versions |= {"onnxruntime": form.version, "provider": form.provider}
    return versions


def _example(
    model: nn.Module, input_shape: tuple[int, ...], channels_last: bool = False, batch: int = 1
) -> torch.Tensor:
    device = next(model.parameters()).device
    example = torch.zeros(batch, *input_shape, device=device)
    return example.contiguous(memory_format=torch.channels_last) if channels_last else example


def check_provider_ran(device: str, ran: list[str]) -> None:
    """onnxruntime falls back to the CPU provider, with a log line only, when its CUDA provider
    cannot load (a missing CUDA or cuDNN library): on a CUDA run that is an error."""
    if device == "cuda" and (not ran or ran[0] != "CUDAExecutionProvider"):
        fallback = ran[0] if ran else "no provider"
        raise RuntimeUnavailableError(
            f"measure.runtime=onnxruntime on cuda: onnxruntime fell back to {fallback}"
            f" (its CUDAExecutionProvider did not load: see its log above for the missing "
            f"library), so its timings would be CPU timings; install the CUDA and cuDNN "
            f"versions onnxruntime-gpu needs, or device=cpu"
        )


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime InferenceSession behind a module's call, torch tensor in and out, so that
    the timing code runs it like the torch forms.

    The conversions count in each timed call, as they would in a PyTorch program that deploys
    with onnxruntime: on the CPU they are free for a contiguous float32 batch (numpy shares its
    memory), a channels_last batch is copied to NCHW first (the exported graph takes NCHW). On
    CUDA the batch is bound in place (IO binding) and only the logits come back through the host.
    """

    def __init__(self, session, device: torch.device) -> None:
        super().__init__()
        import onnxruntime

        self.session = session
        self.device = device
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.provider = session.get_providers()[0]
        self.version = onnxruntime.__version__

    @classmethod
    def export(
        cls, model: nn.Module, example: torch.Tensor, threads: int | None = None
    ) -> OnnxRuntimeModel:
        """Export `model` (torch.onnx, dynamic batch) to a temporary file and open a session on
        it: CUDAExecutionProvider first where the model is on CUDA and onnxruntime has it."""
        import onnxruntime

        from pipeline.models.pruned import _onnx_export

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        # Two sessions (baseline and pruned) are timed in alternating rounds, each with its own
        # thread pool; spinning threads of the idle one would take the cores from the one being
        # timed (on 2 cores the same baseline's p50 varied 5.2-8.6 ms between pairs).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        device = example.device.type
        providers = onnxruntime_providers(device, _available_providers())
        if device == "cuda":
            providers[0] = ("CUDAExecutionProvider", {"device_id": example.device.index or 0})
        # The session keeps the graph in memory: the file is only the exporter's way across.
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            _onnx_export(model, example.contiguous(), path)
            session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        check_provider_ran(device, session.get_providers())
        return cls(session, example.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.provider == "CUDAExecutionProvider" and images.is_cuda:
            return self._run_on_cuda(images)
        batch = images.detach().cpu().contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: batch})
        return torch.from_numpy(logits).to(images.device)

    def _run_on_cuda(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np

        batch = images.detach().contiguous()
        # onnxruntime runs on its own stream: the batch must be written before it reads it.
        torch.cuda.current_stream(batch.device).synchronize()
        binding = self.session.io_binding()
        binding.bind_input(
            self.input_name,
            "cuda",
            batch.device.index or 0,
            np.float32,
            tuple(batch.shape),
            batch.data_ptr(),
        )
        binding.bind_output(self.output_name, "cuda", batch.device.index or 0)
        self.session.run_with_iobinding(binding)
        (logits,) = binding.copy_outputs_to_cpu()
        return torch.from_numpy(logits).to(images.device)
