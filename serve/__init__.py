"""onnxruntime sessions, the Open Inference Protocol service, and the latency benchmark."""
