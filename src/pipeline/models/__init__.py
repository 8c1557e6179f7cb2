"""Models: the builders conf/model/ names (`pipeline.models.<builder>`, also recorded in every
saved pruned model), pruned-model files, parameter and MAC counts, the baseline cache."""

from pipeline.models.zoo import efficientnet_lite0, mobilenet_v2, torchvision_classifier

__all__ = ["efficientnet_lite0", "mobilenet_v2", "torchvision_classifier"]
