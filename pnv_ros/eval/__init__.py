"""Evaluation: ground truth, metrics (Recall@N, precision/recall), reports."""
