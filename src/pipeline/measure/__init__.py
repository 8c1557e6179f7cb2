"""Measuring models: latency, the forms a model is timed in, resources, paired uncertainty."""
