"""What a config must pass before any work: value ranges, `_target_`s and config lists
(settings), the disk, the model and the tracking server (preflight), and every job of a
command line (sweep_plan). Each failure is one ConfigError line naming the key."""
