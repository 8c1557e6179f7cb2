"""No loader of weights runs code: a crafted pickle whose payload would create a file is refused
by every loader (checkpoints, model weights and pruned models with one line; a baseline cache
entry, which can always be made again, is set aside and trained again)."""

import os
import pickle

import pytest
import torch

from conftest import digits_inputs
from pipeline import load_pruned
from pipeline.checks.settings import settings_from
from pipeline.config.compose import compose
from pipeline.errors import WeightsUnavailableError
from pipeline.models.baseline_cache import load_weights
from pipeline.models.zoo import load_state_dict, mobilenet_v2
from pipeline.stages.baseline import baseline


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


def crafted_files(tmp_path, marker):
    """The payload as torch.save writes it and as a bare pickle, under the names loaders expect."""
    files = {}
    torch.save({"state_dict": Payload(marker)}, tmp_path / "torch.pt")
    files["torch.save"] = tmp_path / "torch.pt"
    raw = pickle.dumps(Payload(marker))
    for name in ("raw.pt", "raw.safetensors"):
        (tmp_path / name).write_bytes(raw)
        files[name] = tmp_path / name
    return files


@pytest.mark.parametrize("key", ["baseline.checkpoint", "model.weights"])
def test_checkpoint_loaders_refuse_pickled_code(tmp_path, marker, key):
    for name, path in crafted_files(tmp_path, marker).items():
        with pytest.raises(WeightsUnavailableError) as caught:
            if key == "model.weights":
                mobilenet_v2(num_classes=10, weights=str(path))
            else:
                load_state_dict(path, key=key)
        message = str(caught.value)
        assert message.startswith(f"{key}={path}: ") and "\n" not in message, (name, message)
        assert not marker.exists(), f"{name}: the payload ran"
    with pytest.raises(WeightsUnavailableError, match="refused, the file holds pickled objects"):
        load_state_dict(tmp_path / "torch.pt", key=key)


def test_cache_and_pruned_model_loaders_refuse_pickled_code(tmp_path, marker):
    raw = crafted_files(tmp_path, marker)["raw.safetensors"]
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own error: not a safetensors file)
        load_weights(raw)
    # The baseline stage reads the payload as its cache entry: refused, removed, trained again.
    cache_path = tmp_path / "cache" / "baselines" / "entry.safetensors"
    cache_path.parent.mkdir(parents=True)
    cache_path.write_bytes(raw.read_bytes())
    settings = settings_from(compose(["baseline.epochs=1", "max_batches=1"]))
    model = mobilenet_v2(num_classes=10)
    result = baseline(model, digits_inputs(max_batches=1), settings.baseline, cache_path)
    assert result.source == "trained"
    assert load_weights(cache_path)[0].keys() == model.state_dict().keys()
    folder = tmp_path / "pruned_model"
    folder.mkdir()
    (folder / "architecture.json").write_text(
        '{"format": 1, "model": {"_target_": "pipeline.models.mobilenet_v2", "num_classes": 10},'
        ' "layers": {}}'
    )
    (folder / "model.safetensors").write_bytes(raw.read_bytes())
    with pytest.raises(WeightsUnavailableError, match="not a pruned model") as refused:
        load_pruned(folder)
    assert "\n" not in str(refused.value)
    assert not marker.exists(), "the payload ran"
