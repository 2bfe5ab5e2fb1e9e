"""Analyses of trained checkpoints (``moba-cp analyze ...``); nothing below the CLI imports this package."""
