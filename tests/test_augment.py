"""FlipAndShift must give torchvision's images from the same random state, and leave the state
where torchvision leaves it (a seeded run's data, and everything drawn after, stay the same)."""

import pytest
import torch
from torchvision import transforms as T

from pipeline.data.augment import FlipAndShift


@pytest.mark.parametrize(
    ("shape", "translate"),
    [((1, 32, 32), 0.08), ((3, 28, 20), 0.08), ((1, 16, 16), 0.3), ((2, 9, 40), 0.5)],
)
def test_flip_and_shift_matches_torchvision(shape, translate):
    reference = T.Compose(
        [T.RandomHorizontalFlip(), T.RandomAffine(degrees=0, translate=(translate, translate))]
    )
    fast = FlipAndShift(translate)
    images = torch.randn(400, *shape)
    torch.manual_seed(7)
    expected = [reference(image) for image in images]
    after_reference = torch.rand(4)
    torch.manual_seed(7)
    got = [fast(image) for image in images]
    after_fast = torch.rand(4)
    # Bit for bit (signed zeros too), and the moves really happened.
    assert all(
        torch.equal(a.view(torch.int32), b.view(torch.int32))
        for a, b in zip(expected, got, strict=True)
    )
    assert sum(not torch.equal(image, out) for image, out in zip(images, got, strict=True)) > 300
    assert torch.equal(after_reference, after_fast)
