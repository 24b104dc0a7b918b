"""cohw_utils: the one package every chapter of the cohw book calls.

Its spine is :func:`cohw_utils.spine.trace.trace`, which runs any PyTorch callable under a torch
dispatch mode and returns an op table (a pandas DataFrame, one row per aten op executed, with
its module, shapes, dtypes, FLOPs, MACs and bytes). Every chapter is a thin view of that table.
"""
__version__ = "0.1.0"
