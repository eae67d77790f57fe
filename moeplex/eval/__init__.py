"""Quality evaluation: perplexity per model and domain on held-out text."""
