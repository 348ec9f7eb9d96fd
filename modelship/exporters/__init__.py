"""Conversions: torch -> ONNX, ONNX -> TensorRT engine."""

DEFAULT_OPSET = 17  # the ONNX opset export writes unless --opset says otherwise
