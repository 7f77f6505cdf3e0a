"""Evaluation of trained models: tasks, runners, answer checkers and metrics (see the modules of this package)."""
