"""Layer ``views``: functions of an op table or a config (and a ``Hardware``), never a trace.

- :mod:`~cohw_utils.views.roofline`: time per op on a chip, ideal and with a fitted efficiency
  model (the predictor).
- :mod:`~cohw_utils.views.memory_budget`: the one serving-memory budget (weights + KV cache +
  reserve) and "does it fit".
- :mod:`~cohw_utils.views.kvcache`: KV-cache bytes per token, per sequence, per batch.
- :mod:`~cohw_utils.views.energy_model`: energy per op and per byte moved.
- :mod:`~cohw_utils.views.systolic`: GEMM shapes to systolic-array cycles.
- :mod:`~cohw_utils.views.target_coverage`: which ops a target (runtime, accelerator) covers.

A view does not trace again, import a notebook, or know which chapter calls it; the layer
contract (``tests/test_layers.py``) forbids imports of ``spine.trace`` and ``spine.analyze``.
"""
