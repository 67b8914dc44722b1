"""Evaluation of the trait: prompts, metrics, confidence intervals and the report."""
