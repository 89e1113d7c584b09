"""ONNX / TensorRT export and the Triton model repository."""
