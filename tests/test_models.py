import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.config.compose import compose
from pipeline.models.stats import count_macs, count_params, size_bytes
from pipeline.models.zoo import build_from_config, mobilenet_v2


def test_reference_mobilenet_v2_has_the_published_parameter_count():
    model = mobilenet_v2(num_classes=37)
    assert count_params(model) == 4_130_853
    widths = [m.out_features for m in model.classifier if isinstance(m, nn.Linear)]
    assert widths == [1024, 512, 128, 37]


@pytest.mark.parametrize(
    ("overrides", "direct"),
    [
        ([], {}),
        (["model.head=[256]", "model.dropout=0.2"], {"head": [256], "dropout": 0.2}),
    ],
    ids=["defaults", "head-and-dropout"],
)
def test_builder_from_config_matches_direct_call(overrides, direct):
    config = OmegaConf.to_container(compose(overrides).model, resolve=True)
    torch.manual_seed(0)
    from_config = build_from_config(config).eval()
    torch.manual_seed(0)
    by_hand = mobilenet_v2(num_classes=10, **direct).eval()

    assert str(from_config) == str(by_hand)  # the same layers, widths and dropout rates
    built, expected = from_config.state_dict(), by_hand.state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in expected.items()}
    for name, tensor in expected.items():
        assert torch.equal(built[name], tensor), f"{name} differs"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_config(images), by_hand(images), rtol=0, atol=0)


def test_stats_of_a_known_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    assert count_params(model) == 3 * 8 * 9 + 8 + 128 * 5 + 5
    assert count_macs(model, (3, 4, 4)) == 8 * 4 * 4 * 3 * 9 + 128 * 5
    assert size_bytes(model) == 4 * count_params(model)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from pipeline.errors import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="model.weights=.*no such checkpoint"):
        mobilenet_v2(num_classes=10, weights=str(tmp_path / "missing.pt"))
