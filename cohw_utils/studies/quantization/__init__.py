"""Chapter 4.2b (quantization): the small LM the book trains (:mod:`.tinylm`), and its quantization.

Modules, lowest first: :mod:`.schemes` (formats, RTN), :mod:`.kernels` (CPU kernels),
:mod:`.blocks` (which linears, block walking), :mod:`.gguf_blocks` (llama.cpp blocks and files),
:mod:`.gptq` and :mod:`.awq` (the calibrated methods), :mod:`.activation` (W8A8, SmoothQuant and
FP8: activation quantization, emulated), :mod:`.methods` (quantize a whole model),
:mod:`.kv_quant` (int4/fp8 KV caches, the int8 attention paths), :mod:`.kv_int8` (the int8 KV
cache), :mod:`.scale_up` (Llama-2 bytes, fit, decode bound; published results), :mod:`.ladder`
(the GEMV kernel ladder) and :mod:`.results` (the chapter's tables and figures, Chapter 5's
measured bit floor). Used by Chapter 4.2b."""
