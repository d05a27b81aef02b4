"""Recipes: the end-to-end pipelines behind experiments/demo.py, beta_study.py, repro.py and
bench.py, as functions that tests and other recipes call in-process."""
