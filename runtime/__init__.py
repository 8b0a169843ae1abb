"""flowae.runtime: the torch-free part that ships to the device (onnxruntime, numpy, Pillow, click).

It never imports torch, torchvision, the training modules of flowae or flowae.export.
`__version__` is the installed distribution's version, read from its metadata, so the number
is written once (in pyproject.toml). Standard library only, here.
"""

import importlib.metadata


def _installed_version() -> str:
    try:
        return importlib.metadata.version("flowae")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()
