"""The analysis stage: pure numpy/pandas functions from sweep results to geometry, edge, coverage frames and findings.

Never imports torch, jinja2 or matplotlib; called once per job on what the compute stage measured.
"""
