"""Chapter 5 (the co-design loop): a parametric accelerator evaluated on the proxy set with the
earlier chapters' models, swept, and reduced to Pareto fronts and a requirements table.

This subpackage is a *view*, not a new model: every number comes from the op tables
(:mod:`cohw_utils.spine.trace`, traced once per phase and reused for every design point), the
roofline of :mod:`cohw_utils.views.roofline` and the energy model of
:mod:`cohw_utils.views.energy_model`. What it adds is a design space, memory tiers below HBM,
and sweeps, scores and Pareto fronts. Units are SI (FLOP/s, bytes, bytes/s, seconds, joules);
areas are mm^2. Modules, lowest first:

- :mod:`.accelerator`: the design point (:class:`~.accelerator.Accelerator`), catalog chips as
  designs, and the silicon-area cost proxy (:class:`~.accelerator.CostModel`);
- :mod:`.phases`: a traced phase prepared once for any number of designs, weight formats;
- :mod:`.proxy_phases`: the whole proxy set traced and prepared, and its phase weights;
- :mod:`.placement`: where weights and KV cache live (spill policies);
- :mod:`.op_times`: per-op times of one design (the roofline with one roof per tier);
- :mod:`.sweep`: many designs on many phases at once (time, energy, binding resource), grids;
- :mod:`.pareto`: scores relative to a reference, Pareto fronts, the chosen design, sensitivity;
- :mod:`.what_if`: hardware features applied alone, and one turn of the loop;
- :mod:`.shape_plane`: the decode plane (batch x context): when batching can reach the compute
  roof, from the decode cost function;
- :mod:`.generations`: compute, bandwidth and capacity across GPU generations;
- :mod:`.figures`: the chapter's figures;
- :mod:`.requirements`: the requirements roll-up.

The exercises' self-checks are in :mod:`cohw_utils.book.exercises`. Used by Chapter 5.
"""
