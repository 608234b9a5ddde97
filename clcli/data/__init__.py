"""Datasets (sources), preprocessing recipes and task scenarios."""
