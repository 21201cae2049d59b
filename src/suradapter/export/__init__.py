"""ONNX export of the adapted text path, and the ONNX Runtime session factory."""
