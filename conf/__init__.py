"""The pipeline's Hydra configs, installed as the package `pipeline.conf` (see pyproject.toml)."""
