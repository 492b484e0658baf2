"""What the plugin remembers about the session and the message, kept by the
relay (always available; no grant). Each plugin writes only its own keys;
:func:`get_from` reads another plugin's.

A classifier that decides at ``data`` and a route that follows at
delivery::

    def data(self, session, envelope, message):
        bulk = message.first_header("Precedence") == "bulk"
        metadata.set(Scope.TRANSACTION, "class", "bulk" if bulk else "normal")

    def route(self, envelope, rcpt, headers):
        if metadata.get(Scope.TRANSACTION, "class") == "bulk":
            return Route.smarthost("smtp://bulk.example.net:25")
        return Route.DEFAULT

A refused write raises :class:`postern.Err` whose ``value`` says why:
``MetadataError_TooLarge`` (past the relay's size limit), ``_NoScope``,
``_ReadOnly`` (at ``route`` and ``delivered``) or ``_InvalidKey``.
"""

from wit_world.imports import metadata as _host

Scope = _host.Scope
SESSION = Scope.SESSION
TRANSACTION = Scope.TRANSACTION
MetadataError_TooLarge = _host.MetadataError_TooLarge
MetadataError_NoScope = _host.MetadataError_NoScope
MetadataError_ReadOnly = _host.MetadataError_ReadOnly
MetadataError_InvalidKey = _host.MetadataError_InvalidKey


def get(scope, key):
    """This plugin's value for ``key`` in ``scope``, or ``None``."""
    return _host.get(scope, key)


def set(scope, key, value):
    """Sets this plugin's value for ``key``."""
    _host.set(scope, key, value)


def remove(scope, key):
    """Removes this plugin's value for ``key``; returns whether there was one."""
    return _host.remove(scope, key)


def keys(scope):
    """This plugin's keys in ``scope``."""
    return _host.keys(scope)


def get_from(plugin, scope, key):
    """Another plugin's value, by its ``[[plugin]] name`` (read only)."""
    return _host.get_from(plugin, scope, key)
