"""Benchmarks and load generators: engine step speed, serving traces, quality reports."""
