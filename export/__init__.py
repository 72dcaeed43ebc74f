"""Export: a training run's checkpoint -> a self-contained ONNX artifact folder (and HF or GGUF files).

``nextoken.export.artifact`` is the artifact contract, torch-free (serving imports it, and
``runtime``, to read, check and run artifacts); the exporters and the parity checks need PyTorch
and the training code. Export knows nothing about serving, the models registry or the pipelines
that publish what it writes (``nextoken.registry``, ``nextoken.up``, ``nextoken.retrain``).
"""

from typing import Any

__all__ = ["export_run"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import nextoken.export.artifact` (serving) never pulls in torch.
    if name == "export_run":
        from nextoken.export.build import export_run

        return export_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
