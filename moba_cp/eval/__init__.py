"""Evaluation: needle-in-a-haystack retrieval, trailing / position-wise loss, comparison plots."""
