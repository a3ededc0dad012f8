"""User-facing errors.

Every problem caused by the user's input (a missing folder, a malformed file name, a corrupt PNG, missing
weights) raises :class:`PBIPError` with one line that names the file and the reason. The command line
prints that line and exits with status 2; library users can catch the class.
"""


class PBIPError(Exception):
    """A clear, actionable error about the user's input (data, weights, configuration)."""


class DataError(PBIPError, ValueError):
    """A dataset folder or file does not follow the dataset-folder format of docs/DESIGN.md."""


class WeightsError(PBIPError, FileNotFoundError):
    """Pretrained weights are not available locally (hub downloads do not work offline)."""


class ConfigError(PBIPError, KeyError):
    """A configuration key or value is invalid."""

    def __str__(self) -> str:  # KeyError quotes its message; keep one plain line
        return str(self.args[0]) if self.args else ""


class TrainingError(PBIPError, RuntimeError):
    """Training cannot go on (for example a NaN/inf loss)."""


class RunClaimedError(PBIPError):
    """A run folder is in use by another live process (see :mod:`pbip_core.engine.claims`)."""


class MissingRunsError(PBIPError):
    """A chapter needs runs that are not in the results folder and may not train them itself (the paper profile)."""
