"""`python -m pipeline [overrides]`: see pipeline.cli and conf/config.yaml."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
