"""Benchmarks: run as scripts (``python bench/adapter_step.py``); nothing here is imported by the trainer."""
