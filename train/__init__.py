"""Training companion: tokenizers, data pipeline, the GPT model and its training loop.

This package needs PyTorch (``pip install 'nextoken[train]'``); serving never imports it.
"""
