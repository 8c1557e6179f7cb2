"""The one train/evaluate loop, the convergence check, and seeding."""
