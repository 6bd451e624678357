"""The service only: onnxruntime sessions and the Open Inference Protocol HTTP app (never imports torch)."""
