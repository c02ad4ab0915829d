"""Evaluation: cached generation, metrics, reports."""
