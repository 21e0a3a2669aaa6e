"""The compute stage: models, the exact float32 surrogate and the sweeps that turn output positions into supports.

The only room (with `run`, `compat` and `examples`) that imports torch. It hands numpy results
(`rfreport.results`) and DataFrames on; it never renders.
"""
