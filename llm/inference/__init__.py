"""Generation: the torch-free decoding core, PyTorch generation, the ONNX export and runtime, the chat session."""
