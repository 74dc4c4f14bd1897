"""Evaluation: paper-style perplexity (more in later issues: zero-shot, KL, speed)."""
