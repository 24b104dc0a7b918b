"""Chapters 4.1-4.3 (performance analysis): FLOP counters compared (:mod:`.counter_comparison`),
memory footprint and liveness (:mod:`.memory`), decode MBU (:mod:`.mbu`), KV-cache paging
(:mod:`.paging`), operator classes (:mod:`.opclasses`), fusion (:mod:`.fusion`), the matmul
ladder (:mod:`.matmul_ladder`), matrix units by dtype (:mod:`.matmul_dtypes`), batching
(:mod:`.batching`) and a layer's costs as formulas in batch and length (:mod:`.shape_costs`)."""
