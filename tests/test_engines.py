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


def test_the_report_tells_every_pruner_apart_by_engine_and_criterion(tiny_config):
    """A sweep over every criterion must not end in rows a reader cannot tell apart."""
    from omegaconf import OmegaConf

    from pipeline.report.compare import criterion, engine_name

    pruners = ("mean_rank", "apoz", *NEW_PRUNERS)
    labels = {}
    for pruner in pruners:
        config = OmegaConf.to_container(
            tiny_config(f"pruner={pruner}"), resolve=True, enum_to_str=True
        )
        # Without a "pruning" record (runs from before engines were a choice), from the target.
        labels[pruner] = (engine_name({"config": config}), criterion({"config": config}))
    assert len(set(labels.values())) == len(pruners), labels
    for pruner, (engine, _) in labels.items():
        assert engine == ("Torch-Pruning" if pruner.startswith("tp_") else "NNI"), labels
    assert labels["mean_rank"][1] == "MeanRank of abs"
    assert labels["tp_magnitude"][1] == "Magnitude p=2"
    config = OmegaConf.to_container(
        tiny_config("pruner=tp_lamp", "pruner.global_pruning=true"), resolve=True
    )
    assert criterion({"config": config}) == "LAMP p=2 global"


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
        (("pruner=mean_rank", "pruner.submodules=[x]"), "pruner.submodules=['x']"),
        (
            ("pruner=tp_magnitude", "pruner.global_pruning=true", "pruner.submodules=['*.mlp']"),
            "pruner.submodules",
        ),
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


def shufflenet_inputs():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.datasets import Loaders, StageInputs

    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    return StageInputs(Loaders(loader, (), ()), nn.CrossEntropyLoss(), torch.device("cpu"),
                       (3, 32, 32))  # fmt: skip


def test_only_the_widths_free_inside_submodules_where_the_whole_graph_fails(tiny, tmp_path):
    """ShuffleNetV2's channel shuffle stops Torch-Pruning's tracer; pruner.submodules prunes
    each branch's inner width on its own graph, and the model saves and reloads."""
    from pipeline.errors import UnsupportedModelError
    from pipeline.models.pruned import save_pruned
    from pipeline.models.zoo import build_from_config
    from pipeline.pruning.steps import prune_in_steps

    config = {"_target_": "pipeline.models.torchvision_classifier",
              "name": "shufflenet_v2_x0_5", "num_classes": 10, "weights": "none"}  # fmt: skip
    torch.manual_seed(0)
    model = build_from_config(config).eval()
    whole = tiny("pruner=tp_magnitude", "pruner.iterations=1").pruner
    with pytest.raises(UnsupportedModelError, match="Torch-Pruning .* cannot prune this model"):
        prune_in_steps(build_from_config(config), shufflenet_inputs(), whole, 0.3)

    settings = tiny(
        "pruner=tp_magnitude", "pruner.iterations=1", "pruner.submodules=['*.branch2']"
    ).pruner
    pruned = prune_in_steps(build_from_config(config), shufflenet_inputs(), settings, 0.3)
    small = pruned.model.eval()
    before = {n: p.shape for n, p in model.named_parameters()}
    changed = {n for n, p in small.named_parameters() if p.shape != before[n]}
    assert changed and all(".branch2." in name for name in changed), changed
    # The branch's first convolution loses channels; its last keeps the width that leaves it.
    assert small.stage2[1].branch2[0].out_channels < model.stage2[1].branch2[0].out_channels
    assert small.stage2[1].branch2[5].out_channels == model.stage2[1].branch2[5].out_channels
    save_pruned(small, config, tmp_path / "pruned")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "pruned")(images), small(images))


def test_submodules_that_match_nothing_are_refused_in_one_line(tiny):
    from pipeline.models.zoo import mobilenet_v2
    from pipeline.pruning.steps import prune_in_steps

    settings = tiny(
        "pruner=tp_magnitude", "pruner.iterations=1", "pruner.submodules=['*.mlp']"
    ).pruner
    with pytest.raises(ConfigError, match=r"pruner.submodules: \['\*.mlp'\] match no submodule"):
        prune_in_steps(mobilenet_v2(10), shufflenet_inputs(), settings, 0.3)


SMALL_VIT = {"_target_": "torchvision.models.vision_transformer.VisionTransformer",
             "image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4,
             "hidden_dim": 64, "mlp_dim": 128, "num_classes": 10}  # fmt: skip


def test_a_vision_transformer_loses_width_and_reloads_without_either_engine(tiny, tmp_path):
    """Torch-Pruning narrows a torchvision ViT's residual width with every head (its class
    token, position embedding, attention projections and hidden_dim follow), to a multiple of
    the head count; the saved model reloads where neither engine can be imported."""
    from pipeline.errors import UnsupportedModelError
    from pipeline.models.pruned import save_pruned
    from pipeline.models.zoo import build_from_config
    from pipeline.pruning.steps import prune_in_steps

    torch.manual_seed(0)
    settings = tiny("pruner=tp_magnitude", "pruner.iterations=1").pruner
    vit = build_from_config(SMALL_VIT, ["torchvision."])
    small = prune_in_steps(vit, shufflenet_inputs(), settings, 0.3).model.eval()
    attention = small.encoder.layers[0].self_attention
    assert small.hidden_dim == small.conv_proj.out_channels == attention.embed_dim < 64
    assert attention.embed_dim % 4 == 0 and attention.num_heads == 4
    assert small.class_token.shape[-1] == small.encoder.pos_embedding.shape[-1] == small.hidden_dim
    directory = tmp_path / "vit"
    save_pruned(small, SMALL_VIT, directory, ["torchvision."])
    images = torch.randn(3, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = small(images)
    script = RELOAD_WITHOUT_ENGINES.replace('trusted=["timm."]', 'trusted=["torchvision."]')
    subprocess.run(
        [sys.executable, "-c", script, str(directory), str(tmp_path / "images.pt"),
         str(tmp_path / "scores.pt")],
        check=True,
    )  # fmt: skip
    assert torch.equal(torch.load(tmp_path / "scores.pt", weights_only=True), expected)

    # torch's nn.MultiheadAttention keeps its heads in Torch-Pruning 1.6: said, not ignored.
    heads = tiny("pruner=tp_magnitude", "pruner.iterations=1", "pruner.prune_heads=true").pruner
    vit = build_from_config(SMALL_VIT, ["torchvision."])
    with pytest.raises(UnsupportedModelError, match="removed no attention head"):
        prune_in_steps(vit, shufflenet_inputs(), heads, 0.3)


def test_a_model_narrowed_into_one_that_does_not_run_is_said_in_one_line(tiny):
    """timm's attention reshapes to its input's width, which Torch-Pruning cannot see: the
    whole-graph run is refused in one line that names pruner.submodules, which then works."""
    pytest.importorskip("timm")
    from pipeline.errors import UnsupportedModelError
    from pipeline.models.zoo import build_from_config
    from pipeline.pruning.steps import prune_in_steps

    config = {"_target_": "timm.create_model", "model_name": "vit_tiny_patch16_224",
              "num_classes": 10, "pretrained": False, "img_size": 32}  # fmt: skip
    whole = tiny("pruner=tp_magnitude", "pruner.iterations=1").pruner
    with pytest.raises(UnsupportedModelError, match=r"no longer runs.*pruner.submodules"):
        prune_in_steps(build_from_config(config, ["timm."]), shufflenet_inputs(), whole, 0.3)
    mlps = tiny("pruner=tp_magnitude", "pruner.iterations=1", "pruner.submodules=['*.mlp']")
    small = prune_in_steps(
        build_from_config(config, ["timm."]), shufflenet_inputs(), mlps.pruner, 0.3
    ).model
    assert small.blocks[0].mlp.fc1.out_features < 768
    assert small.blocks[0].attn.qkv.out_features == 576
