"""flowae: a convolutional autoencoder + classifier for Oxford 102 Flowers, deployed as ONNX.

This top-level module stays import-light: the device runtime (flowae.runtime) is installed
without torch, so nothing here may import it. The version is defined once, in pyproject.toml,
and read from the installed package's metadata.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
