"""Serving: an OpenAI-compatible LitServe server over an ONNX artifact, with continuous batching.

Nothing here imports PyTorch or the training code: the server reads only the artifact folder.
"""
