"""lineside agent: on-device X-ray inspection with ONNX Runtime. Never imports MXNet or `export`."""

__version__ = "0.1.0"
