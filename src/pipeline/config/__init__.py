"""The configuration: the typed schema, composition of conf/, the checks made before any work."""
