import subprocess
import sys

import torch

from conftest import prune_digits_model
from pipeline import load_pruned, save_pruned
from pipeline.models.zoo import mobilenet_v2
from pipeline.pruning.nni.adapter import speedup

MODEL_CONFIG = {"_target_": "pipeline.models.mobilenet_v2", "num_classes": 10, "weights": "none"}

RELOAD = """
import sys, torch
from pipeline import load_pruned
model = load_pruned(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=True)
torch.save(model(inputs), sys.argv[3])
assert "nni" not in sys.modules, "load_pruned imported NNI"
"""


def test_pruned_model_reloads_in_a_fresh_process_with_the_same_outputs(tiny, tmp_path):
    settings = tiny("sparsity=0.3")
    result = prune_digits_model(settings, 0.3)
    pruned = speedup(result.model, result.masks, (3, 32, 32), 8).eval()
    directory = save_pruned(pruned, MODEL_CONFIG, tmp_path / "pruned_model")

    inputs = torch.randn(4, 3, 32, 32)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = pruned(inputs)
    subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            str(directory),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        check=True,
    )
    reloaded = torch.load(tmp_path / "outputs.pt", weights_only=True)
    torch.testing.assert_close(reloaded, expected)

    in_process = load_pruned(directory)
    assert sum(p.numel() for p in in_process.parameters()) == sum(
        p.numel() for p in pruned.parameters()
    )


def test_saving_is_all_or_nothing(tmp_path):
    class Odd(torch.nn.Module):
        def forward(self, x):
            return x

    model = mobilenet_v2(num_classes=10)
    model.features[0] = Odd()
    try:
        save_pruned(model, MODEL_CONFIG, tmp_path / "pruned_model")
    except TypeError as error:
        assert "features.0" in str(error)
    else:
        raise AssertionError("an unknown layer type must not be saved")
    assert not (tmp_path / "pruned_model").exists()
