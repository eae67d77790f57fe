"""Benchmarks: commands that measure systems side by side in one run and print ratios."""
