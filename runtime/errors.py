"""The one error hierarchy of flowae. Standard library only.

Library code raises these with a message that says what was expected and what was found;
each CLI turns a FlowaeError into a one-line message and a non-zero exit. It lives in the
runtime because every part of the project may import the runtime, never the reverse.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: how a
    library's multi-line error becomes part of a one-line flowae message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FlowaeError(Exception):
    """Base class of every error flowae raises on purpose."""


class ContractError(FlowaeError):
    """A model or its metadata does not follow the contract this runtime reads."""


class ModelLoadError(FlowaeError):
    """An ONNX file or model directory cannot be loaded."""


class ImageError(FlowaeError):
    """An input image cannot be read or used."""


class DataError(FlowaeError):
    """The training dataset is missing or unreadable."""


class CheckpointError(FlowaeError):
    """A file is not a flowae checkpoint, or does not fit the model it is loaded into."""


class ExportError(FlowaeError):
    """An export step failed, including the parity and accuracy gates."""
