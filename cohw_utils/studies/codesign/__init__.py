"""Chapter 5 (the co-design loop): the parametric accelerator, sweeps and Pareto fronts
(:mod:`.design`) and the requirements roll-up (:mod:`.requirements`)."""
