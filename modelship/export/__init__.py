"""Conversions: torch -> ONNX, ONNX -> TensorRT engine."""
