"""Evaluation: perplexity (and, later, zero-shot tasks, sweeps and plots)."""
