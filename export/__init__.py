"""Export: a training run's checkpoint -> a self-contained ONNX artifact folder.

``nextoken.export.artifact`` is torch-free (serving imports it to read and check artifacts);
the exporter and the parity check need PyTorch and the training code.
"""

from typing import Any

__all__ = ["export_run"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import nextoken.export.artifact` (serving) never pulls in torch.
    if name == "export_run":
        from nextoken.export.build import export_run

        return export_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
