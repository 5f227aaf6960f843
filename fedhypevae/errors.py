"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class FedHypeVAEError(Exception):
    """An error the user can act on; its message says what to change."""


class ConfigError(FedHypeVAEError):
    """A configuration value or key is invalid."""


class DataError(FedHypeVAEError):
    """Input data is missing, malformed or unsuitable."""


class PrivacyError(FedHypeVAEError):
    """A privacy setting is impossible or a budget would be exceeded."""


class CheckpointError(FedHypeVAEError):
    """A checkpoint is missing, incomplete, or incompatible with the run."""
