"""Layer ``core``: what every other layer needs and that needs nothing of ours.

- :mod:`~cohw_utils.core.errors`: ``CohwError`` and its subclasses (bad input: one line that
  names the problem and the fix).
- :mod:`~cohw_utils.core.dtypes`: one spelling of dtypes (``fp32``, ``bf16``, ``int4``...) and
  their sizes.
- :mod:`~cohw_utils.core.device`: ``resolve_device("auto")``, CUDA when present.
- :mod:`~cohw_utils.core.data`: where the data files are, the one checked CSV reader, the one
  GPU-capture loader.

Used by every chapter, through every other layer.
"""
