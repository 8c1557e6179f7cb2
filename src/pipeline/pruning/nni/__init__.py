"""NNI 2.10.1 as a pruning engine: the only package that imports nni."""
