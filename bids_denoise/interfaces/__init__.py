"""Thin Nipype interfaces: load a run once, run any registered method, report, write derivatives."""
