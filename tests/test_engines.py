"""Two pruning engines behind one interface: every pruner choice runs the five stages, an option
of one engine given to the other is refused, and a model only Torch-Pruning takes goes through
end to end and reloads where neither engine can be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models.pruned import load_pruned
from pipeline.run import run

NEW_PRUNERS = ("l1_norm", "l2_norm", "fpgm", "taylor", "tp_magnitude", "tp_taylor", "tp_lamp",
               "tp_activation")  # fmt: skip


@pytest.mark.parametrize("pruner", NEW_PRUNERS)
def test_each_pruner_runs_the_five_stages(tiny, tmp_path, pruner):
    record = run(tiny(f"pruner={pruner}", "sparsity=0.3"), tmp_path / "run")

    engine = "torch_pruning" if pruner.startswith("tp_") else "nni"
    assert record["pruning"]["engine"] == engine
    assert set(record["stages"]) == {"baseline", "prune", "speedup", "finetune", "measure"}
    assert record["pruned"]["macs"] < 0.8 * record["baseline"]["macs"]
    # Torch-Pruning removes channels while ranking: the record says so instead of a silent stage.
    expected = "done while pruning" if engine == "torch_pruning" else "ModelSpeedup"
    assert record["pruning"]["speedup"] == expected


def test_local_torch_pruning_keeps_the_widths_nni_keeps(tiny):
    """With local pruning and round_to, both engines keep the same channel counts in every
    layer: two criteria compared at one sparsity differ only in which channels they keep."""
    from conftest import digits_inputs
    from pipeline.models.zoo import mobilenet_v2
    from pipeline.pruning.steps import prune_in_steps

    widths = {}
    for pruner in ("mean_rank", "tp_magnitude"):
        settings = tiny(f"pruner={pruner}", "pruner.iterations=1")
        torch.manual_seed(0)
        pruned = prune_in_steps(mobilenet_v2(10), digits_inputs(), settings.pruner, 0.4).model
        widths[pruner] = {n: tuple(p.shape) for n, p in pruned.named_parameters()}
    assert widths["mean_rank"] == widths["tp_magnitude"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("pruner=tp_magnitude", "pruner.activation=relu6"), "pruner.activation='relu6'"),
        (("pruner=tp_lamp", "pruner.mode=normal"), "pruner.mode='normal'"),
        (("pruner=mean_rank", "pruner.global_pruning=true"), "pruner.global_pruning=True"),
        (("pruner=l1_norm", "pruner.training_steps=5"), "pruner.training_steps=5"),
        (("pruner=tp_magnitude", "pruner.isomorphic=true"), "pruner.isomorphic=true"),
        (("pruner=tp_magnitude", "+pruner.importance.q=3"), "pruner.importance.q"),
    ],
)
def test_an_option_the_pruner_does_not_read_is_refused(tiny, overrides, named):
    with pytest.raises(ConfigError) as refused:
        tiny(*overrides)
    line = str(refused.value)
    assert named in line and "\n" not in line


def test_the_refusal_names_the_engine_that_reads_the_option(tiny):
    with pytest.raises(ConfigError, match=r"nni: pruner=mean_rank, apoz"):
        tiny("pruner=tp_magnitude", "pruner.statistics=nni")


TIMM_TINY = ("model=timm", "model.model_name=mobilenetv3_small_100", "pruner.iterations=1")

# Loads a pruned model where neither engine can be imported, and runs it.
RELOAD_WITHOUT_ENGINES = """
import sys
for name in ("nni", "torch_pruning"):
    sys.modules[name] = None  # import raises ImportError
from pipeline.models.pruned import load_pruned
import torch
model = load_pruned(sys.argv[1], trusted=["timm."])
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2], weights_only=True)), sys.argv[3])
"""


def test_a_model_only_torch_pruning_takes_runs_and_reloads_without_it(tiny, tmp_path):
    pytest.importorskip("timm")
    from pipeline.errors import UnsupportedModelError

    # NNI's ModelSpeedup stops at timm's fused BatchNorm+activation, and says which engine works.
    with pytest.raises(UnsupportedModelError, match="pruner=tp_magnitude"):
        run(tiny(*TIMM_TINY, "pruner=mean_rank"), tmp_path / "nni")

    record = run(tiny(*TIMM_TINY, "pruner=tp_magnitude", "sparsity=0.3"), tmp_path / "tp")
    assert record["pruned"]["params"] < record["baseline"]["params"]
    directory = tmp_path / "tp" / "pruned_model"
    model = load_pruned(directory, trusted=["timm."])
    images = torch.randn(3, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = model(images)
    subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_ENGINES, str(directory), str(tmp_path / "images.pt"),
         str(tmp_path / "scores.pt")],
        check=True,
    )  # fmt: skip
    reloaded = torch.load(tmp_path / "scores.pt", weights_only=True)
    assert torch.equal(reloaded, expected)
    architecture = json.loads((directory / "architecture.json").read_text())
    assert architecture["model"]["_target_"] == "timm.create_model"
