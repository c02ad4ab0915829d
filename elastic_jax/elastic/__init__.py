"""Nemotron Elastic: search space, importance, permutation, nested masks, parameter counts, extraction."""
