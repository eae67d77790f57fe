"""Offline half of multi-variant serving: similarity, sharing plans under a budget, merges, reports."""
