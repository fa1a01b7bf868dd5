"""Domain exceptions shared by the agent and the export stage.

Messages say what was expected and what was found, and name the file (and line) involved.
"""

from __future__ import annotations


class LinesideError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(LinesideError):
    """The configuration file is missing, unparsable or invalid."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class BundleError(LinesideError):
    """A model bundle is missing, incomplete, tampered with or fails its golden check."""


class DatasetError(LinesideError):
    """A dataset path, image or annotation is missing or malformed."""


class ImageDecodeError(LinesideError):
    """An image could not be decoded, or breaks the configured limits.

    `code` is a stable machine-readable reason used in error results and failed/ sidecars.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SourceError(LinesideError):
    """A frame source could not be opened or read."""


class InferenceError(LinesideError):
    """ONNX Runtime could not be set up or a model run failed."""


class ExportError(LinesideError):
    """Training, ONNX conversion, parity or bundle packing failed."""


class ParityError(ExportError):
    """ONNX Runtime outputs differ from the MXNet outputs beyond the stated tolerance."""
