"""Verified writers for ONNX, TorchScript, torch.export and Triton model repositories."""
