"""lineside export stage: train in MXNet Gluon, export verified ONNX, pack model bundles."""
