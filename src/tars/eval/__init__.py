"""Evaluation: accuracy from speech and from text, the gap between them, and what the answers looked like."""
