"""Evaluation: domain classifiers (digits) and, with the metrics issue, Frechet distance, KID and
precision/recall."""
