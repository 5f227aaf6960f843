"""Benchmarks: measure and report (medians, ratios from the same run); they assert nothing about speed."""
