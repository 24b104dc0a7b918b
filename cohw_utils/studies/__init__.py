"""Layer ``studies``: what only one chapter needs, one subpackage per chapter.

===============================  ====================================================
``studies.proxies``              Chapter 1: the proxy set at full scale, the ranking
``studies.architecture``         Chapter 2: op inventory, hotspots, NeRF render stages
``studies.enabling``             Chapter 3: export, parity, latency, offload, gap report
``studies.performance``          Chapters 4.1-4.3: counter cross-check, memory, MBU, paging,
                                 operator classes, fusion, matmul ladder, batching
``studies.quantization``         Chapter 4.2b: the small LM, RTN/GPTQ/AWQ/GGUF, int8 KV
``studies.energy``               Chapter 4.4: energy per workload, what-ifs, figures
``studies.codesign``             Chapter 5: parametric accelerator, sweeps, Pareto,
                                 requirements
===============================  ====================================================

A study may import any lower layer and another study; nothing here imports ``book``.
"""
