"""Evaluation: QA metrics and the runner that scores the served graph."""
