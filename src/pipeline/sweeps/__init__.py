"""Sweeps: what each job leaves (outcomes), resume, and what a job returns to a sweeper."""
