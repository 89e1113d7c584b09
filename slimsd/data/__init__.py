"""Datasets: the offline scene dataset and loaders for users\x27 data."""
