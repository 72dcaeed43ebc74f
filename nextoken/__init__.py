"""nextoken: train GPT-style next-token models, export them to ONNX, serve them.

The distribution maps the repository's top-level folders into this namespace:
``train/`` is ``nextoken.train``, ``export/`` is ``nextoken.export``, ``serve/`` is
``nextoken.serve``. Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
