"""Training loops, checkpoints and budgets."""
