"""Layer ``spine``: the op table every chapter reads, and how it is measured.

- :mod:`~cohw_utils.spine.costs`: the counting semantics (FLOPs, MACs, bytes per aten op) and
  ``register_cost``; read its docstring once, every chapter links there.
- :mod:`~cohw_utils.spine.trace`: ``trace(fn, ...)`` runs a callable under a dispatch mode and
  returns the op table, one row per aten op, attributed to its module path.
- :mod:`~cohw_utils.spine.optable`: helpers over an op table (``bytes_moved``, totals, breakdowns
  by class, op and module, hotspots).
- :mod:`~cohw_utils.spine.analyze`: one traced phase of a workload with its totals.
- :mod:`~cohw_utils.spine.costfn` and :mod:`~cohw_utils.spine.phase_costs`: an op table as exact
  functions of batch and length (traced at a few shapes, fitted per row, cached on disk).
- :mod:`~cohw_utils.spine.measure`: the one timing harness (``time_callable``) and
  ``profile_ops`` (torch.profiler joined onto op-table rows).

Imports ``core``, ``workloads`` and ``hardware`` only.
"""
