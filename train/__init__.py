"""Training companion: tokenizers, data pipeline, the GPT model and its training loop.

This package needs PyTorch (``pip install 'nextoken[train]'``), except the modules the commands
read before they train (``config``, ``presets``, ``settings``, ``sources``, ``cli_*``); serving never
imports it. It imports no other stage: export, serving and the pipelines build on it, not it on them.
"""
