"""Reports on runs: the console summary of one run (pipeline.report.console) and the comparison
report of many (`python -m pipeline.report`, pipeline.report.build).

Only the console summary is imported here, so that a run's import stays light and a bad
command line of the report fails before matplotlib or MLflow load."""

from pipeline.report.console import accuracy_cell, latency_cell, notes, summary_table

__all__ = ["accuracy_cell", "latency_cell", "notes", "summary_table"]
