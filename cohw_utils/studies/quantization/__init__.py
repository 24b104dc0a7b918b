"""Chapter 4.2b (quantization): the small LM the book trains (:mod:`.tinylm`), the schemes and
methods (:mod:`.quant`) and GPTQ (:mod:`.gptq`)."""
