"""Writes to the relay's log, tagged with the plugin's name (grant ``log``)."""

from wit_world.imports import log as _host

Level = _host.Level


def error(message):
    """Logs at error level."""
    _host.log(Level.ERROR, str(message))


def warn(message):
    """Logs at warn level."""
    _host.log(Level.WARN, str(message))


def info(message):
    """Logs at info level."""
    _host.log(Level.INFO, str(message))


def debug(message):
    """Logs at debug level."""
    _host.log(Level.DEBUG, str(message))
