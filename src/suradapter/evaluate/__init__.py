"""Evaluation: oracle scoring, embedding alignment, gates and reports."""
