"""The exception types for mistakes a user can fix: AmasError and one subclass per area."""

import signal


class AmasError(Exception):
    """A user-facing error: one line naming the cause and the fix."""


class ConfigError(AmasError):
    """A config key, type or value that cannot be used."""


class DataError(AmasError):
    """Data that cannot be found or read."""


class CheckpointError(AmasError):
    """A file that is not a usable amas checkpoint."""


class ExportError(AmasError):
    """A model or file that cannot be exported as asked."""


class MaskError(AmasError):
    """Masks or groups that do not fit the model."""


class PruneError(AmasError):
    """A pruning plan or removal that cannot be carried out."""


class CriteriaError(AmasError):
    """A pruning method that is unknown or lacks what it needs."""


class TrainingError(AmasError):
    """Training cannot go on (non-finite loss, incompatible resume state)."""


class Stopped(AmasError):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


class SearchError(AmasError):
    """A search or fine-tuning that cannot start: mismatched teacher and data, unusable options."""


class SelectionError(AmasError):
    """A selection that cannot be made: no feasible candidate, a budget too small, unusable levels."""


class PipelineError(AmasError):
    """A pipeline run that cannot continue as asked (other settings in the run directory, unknown method)."""


class QuantizeError(AmasError):
    """A model or calibration data that cannot be quantized to int8 (an untraceable layer, no int8 layers)."""
