"""nextoken: train GPT-style next-token models, export them to ONNX, serve them.

The distribution maps the repository's top-level folders into this namespace:
``train/`` is ``nextoken.train``, ``export/`` is ``nextoken.export``, ``serve/`` is
``nextoken.serve``. Importing this package imports nothing heavy.

Stages as rooms, arrows one way: ``train`` imports no other stage; ``export`` imports ``train``;
``serve`` imports only the artifact contract from ``export`` (``artifact``, ``runtime``). This
package, the umbrella, composes them: the ``nextoken`` command (``cli``), the pipelines that run
several stages (``up``, ``retrain``), the models registry (``registry``), evaluation
(``evaluate``) and the training-run viewer (``runs``). Its shared leaves, ``errors`` and
``fileio`` (and ``__version__`` here), import nothing of nextoken's, so any stage may use them.
"""

__version__ = "0.1.0"
