"""Chapter 3 (SW enabling): export to ONNX and onnxruntime, numerical parity, classified
failures, latency and offload (:mod:`.enabling`), and the SW gap report (:mod:`.gap_report`)."""
