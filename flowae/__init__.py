"""flowae: a convolutional autoencoder + classifier for Oxford 102 Flowers, deployed as ONNX.

This top-level module stays import-light: the device runtime (flowae.runtime) is installed
without torch, so nothing here may import it.
"""

__version__ = "0.1.0"
