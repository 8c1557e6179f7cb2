"""Failures the user can fix: each carries one line that names the setting and what to do."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters; "" for none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


def one_line(error: BaseException, limit: int = 5000) -> str:
    """`Type: first line` of an unexpected error: the console line and the run's error tag."""
    return f"{type(error).__name__}: {first_line(error, limit)}"[:limit]


class PipelineError(Exception):
    """An expected failure; the command line prints its message alone and exits non-zero."""


class ConfigError(PipelineError, ValueError):
    """A setting is missing or outside its allowed values."""


class DataUnavailableError(PipelineError):
    """A dataset is not on disk and cannot be downloaded."""


class WeightsUnavailableError(PipelineError):
    """Pretrained weights or a checkpoint cannot be loaded."""


class SpeedupError(PipelineError):
    """NNI's ModelSpeedup produced a model that does not run."""


class RuntimeUnavailableError(PipelineError):
    """The package a measure.runtime needs is not installed."""


class UnsupportedModelError(PipelineError):
    """NNI cannot prune or speed up this model: an operation it cannot trace a channel through."""


class EmptyLayerError(PipelineError):
    """A sparsity that leaves a layer without a channel: too much (the budget search's probes
    count it as past the target)."""


class DivergedError(PipelineError):
    """The training loss became NaN or infinite: the stage stops instead of training on."""


class OutOfMemoryError(PipelineError):
    """A stage ran out of GPU or host memory at the batch size in force."""


class DiskFullError(PipelineError, OSError):
    """A write found no space left on its device; the half-written file was removed."""


class BadImageError(PipelineError):
    """An image file that cannot be read (truncated, corrupt, not an image)."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, it comes back re-raised with the worker's traceback
        # folded into its message: keep only the line this class was raised with.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)
