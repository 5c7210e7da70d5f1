"""cleanplate.export: ONNX export with parity (onnx), TensorRT engines (tensorrt), a Triton model repository
with BLS removal and scoring models (triton), and a local tritonserver (triton_server). See README "Export"."""
