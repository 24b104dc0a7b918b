"""Chapter 3 (SW enabling): each proxy phase on a second runtime (ONNX and onnxruntime), and the
SW gap list.

- :mod:`.export`: build a tiny phase, ``torch.export`` it, convert to ONNX, run in onnxruntime,
  check parity (:class:`~.export.Conversion`); the parity and failure tables.
- :mod:`.flatten`: structured inputs and outputs as flat tensors for the exporter.
- :mod:`.parity`: per-dtype tolerances and the max-norm comparison with eager PyTorch.
- :mod:`.failures`: failure classes and the classifier of a stage's exception.
- :mod:`.decompose`: aten-level rewrites, the "decompose the op" dirty fix.
- :mod:`.latency`: eager vs ``torch.compile`` vs onnxruntime, and the latency tables.
- :mod:`.offload`: run what the target can of a phase, the rest in PyTorch.
- :mod:`.gap_report`: what the target stack lacks per phase and the share of work each gap blocks.
- :mod:`.training`: a training step tried as a joint forward+backward graph on the runtime.
- :mod:`.gptq_probe`: the package's GPTQ repacked as onnxruntime's MatMulNBits, with parity.
- :mod:`.evidence`: parity on another seed and a second size; a mid-size export with external data.
"""
