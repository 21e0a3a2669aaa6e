"""The run stage: jobs, the measurement plan, executors (in-process, worker processes, Ray), the cache and progress.

Drives compute and analysis for each job and writes the run folder; the only room that knows all stages.
"""
