"""The side-by-side benchmark (bench/run.py)."""
