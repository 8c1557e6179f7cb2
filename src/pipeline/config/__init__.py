"""The configuration: the typed schema (with each field's range), composition of conf/, and the
one settings hash. The checks a composed config must pass are in pipeline.checks."""
