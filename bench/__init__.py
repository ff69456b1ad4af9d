"""Benchmarks: speed (bench/speed.py) and quality (bench/quality.py) of the trained detector."""
