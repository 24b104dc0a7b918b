"""Chapter 4.4 (power and energy): the energy model of :mod:`cohw_utils.views.energy_model` applied
to the proxy workloads.

- :mod:`.estimates`: registry phases traced and split into op roles, joules and roofline time
  per phase, the what-if table (quantization, batch, fusion, processing in memory), the decode
  batch sweep and the model beside GPU measurements.
- :mod:`.figures`: the energy-per-operation chart, where each phase's joules go, energy and
  time per token against batch.
"""
