"""The one exception type users see: the CLI prints its message on one line and exits 1."""


class CaptionerError(ValueError):
    """A problem the user can act on. The message names the file or key and the fix."""


class ConfigError(CaptionerError):
    """An unknown config key, a wrong type, or an unreadable config file."""
