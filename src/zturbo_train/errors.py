"""Typed errors. Library code raises these; only the CLI turns them into exit codes.

Each message says what was wrong, with which value, and what to do next, on one line
where possible, so a user can fix the input without reading a traceback.
"""


class ZTurboError(Exception):
    """Base class: an error a user can fix."""

    exit_code = 1


class ConfigError(ZTurboError):
    """A config file or override is invalid."""

    exit_code = 2


class ModelError(ZTurboError):
    """A model folder, part or repo is missing or is not Z-Image."""


class ModelNotDownloadedError(ModelError):
    """A Hub model `zturbo download` has not fetched yet (a dry run can still plan from its known shapes)."""


class AdapterError(ZTurboError):
    """The training adapter is missing, malformed or for another model."""


class AdapterNotDownloadedError(AdapterError):
    """A Hub training adapter `zturbo download` has not fetched yet."""


class LoraError(ZTurboError):
    """A LoRA file is malformed, not safetensors, or for another model."""


class DataError(ZTurboError):
    """The dataset folder, an image or a caption is unusable."""


class TrainingError(ZTurboError):
    """Training cannot go on (NaN loss, out of memory, refused output folder)."""


class DownloadError(ZTurboError):
    """A download failed: network, authorisation, disk space or a bad folder."""


class OutputError(ZTurboError):
    """An output location cannot be written (read-only, no permission, or under a file)."""
