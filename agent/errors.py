"""Domain exceptions shared by the agent and the export stage.

Messages say what was expected and what was found, and name the file (and line) involved.
"""

from __future__ import annotations

# Process exit codes, the same for both command-line tools.
EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure: bundle, engine, source, store, training, parity
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_IMAGE_ERRORS = 3  # inspect/predict: some images could not be inspected (their error results are written)
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; the unit lists it in RestartPreventExitStatus=


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


class StoreError(LinesideError):
    """A local folder or S3 location could not be listed, read or written."""


class InferenceError(LinesideError):
    """ONNX Runtime could not be set up or a model run failed."""


class ExportError(LinesideError):
    """Training, ONNX conversion, parity or bundle packing failed."""


class ParityError(ExportError):
    """ONNX Runtime outputs differ from the MXNet outputs beyond the stated tolerance."""


class SignatureError(LinesideError):
    """A signing key cannot be read, or a channel pointer's signature is missing or does not verify."""


class UpdateError(LinesideError):
    """A remote model update stopped at `step` (poll, pointer, signature, space, download, verify, prove, swap).

    `transient`: the store could not be reached or read (endpoint down, no bucket, access denied, a
    connection cut mid-download, too little free disk): retried at the next poll. Otherwise the bundle
    itself was refused, and the pointer naming it is not tried again until it changes.
    """

    def __init__(self, step: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.step = step
        self.transient = transient
        self.bundle_id: str | None = None  # the bundle the pointer named, once it was read
        self.version: str | None = None
