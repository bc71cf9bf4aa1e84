"""Evaluation on a split and prediction with evidence pages."""
