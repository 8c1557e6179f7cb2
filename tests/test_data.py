from collections import Counter

from pipeline.data import digits, make_loaders, stratified_indices


def test_digits_splits_are_deterministic_stratified_and_disjoint():
    a = digits(10, 32, 0.1, 0.2, seed=7)
    b = digits(10, 32, 0.1, 0.2, seed=7)
    assert (len(a.train), len(a.val), len(a.test)) == (1257, 180, 360)
    assert a.test.labels.tolist() == b.test.labels.tolist()
    assert a.input_shape == (3, 32, 32)
    counts = Counter(a.test.labels.tolist())
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 2
    image, label = a.val[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_stratified_indices_cover_everything_once():
    labels = [i % 4 for i in range(200)]
    train, val, test = stratified_indices(labels, 0.1, 0.2, seed=1)
    assert sorted(train + val + test) == list(range(200))
    assert len(test) == 40 and len(val) == 20


def test_loaders_shuffle_training_only():
    splits = digits(10, 32, 0.1, 0.2, seed=1)
    loaders = make_loaders(splits, batch_size=32, seed=1)
    first = next(iter(loaders.test))[1].tolist()
    assert first == splits.test.labels[:32].tolist()
