"""User-facing errors: each one renders as a single line naming file and field."""

import reprlib

# Values quoted in messages are cut short: a config may hold anything, an alias bomb included.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4
_SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 60, 30, 60


def show(value: object) -> str:
    """``value`` as a message quotes it: its repr, at most about a hundred characters."""
    return _SHORT.repr(value)


class UserError(Exception):
    """A problem the user can fix; the CLI prints it on one line and exits with code 2."""


class ConfigError(UserError):
    """An invalid config value, located by file and key path (e.g. ``implementations[1].name``)."""

    def __init__(self, source: str, where: str, message: str):
        self.source = source
        self.where = where
        self.message = message
        located = f"{source}: {where}: {message}" if where else f"{source}: {message}"
        super().__init__(located)


class Invalid(Exception):
    """Raised by validators that know the key path but not the file; wrapped into ConfigError."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")
