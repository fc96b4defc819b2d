"""Shipping a model: INT8 through onnxruntime, accuracy measured on the exported files, the deployment table.

  qat     fake quantization for quantization-aware recovery (the distill stage, ``quantize.method: qat``)
  int8    onnxruntime's static quantizer: the INT8 file of an fp32 ONNX export
  ort     running the files: accuracy over a split, latency
  ship    one model: fp32 ONNX with its metadata, the INT8 file, their accuracies and bytes
  table   the deployment table of one run
"""
