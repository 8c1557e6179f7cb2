"""Datasets: the builders conf/dataset/ names (`pipeline.data.<builder>`), their on-disk layouts,
the splits and loaders every stage reads, and augmentation."""

from pipeline.data.datasets import digits, fashion_mnist, imagefolder, pets

__all__ = ["digits", "fashion_mnist", "imagefolder", "pets"]
