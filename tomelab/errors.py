"""User-facing errors: the CLI prints these as one clear message, without a traceback."""


class TomelabError(Exception):
    """A mistake the user can fix (bad config, missing file, ...). The message says how."""


class ConfigError(TomelabError):
    """A TOML config that does not match its dataclass."""


class DataError(TomelabError):
    """Input data that cannot be used at all (as opposed to single bad rows, which are quarantined)."""
