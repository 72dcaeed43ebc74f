"""Export: a training run's checkpoint -> a self-contained ONNX artifact folder.

``nextoken.export.artifact`` is torch-free (serving imports it to read and check artifacts);
the exporter and the parity check need PyTorch and the training code.
"""
