"""Tracking: the Tracker protocol, MLflow runs, the store, and the environment a run records."""
