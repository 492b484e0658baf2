"""The plugin's key-value store (grant ``kv``): shared by all its instances
(and by every relay on the same Redis, with the Redis backend); values
expire after their TTL, ``incr`` is atomic. A failure raises
:class:`postern.Err` whose ``value`` is ``Error_NotANumber``,
``Error_TooLarge`` or ``Error_Unavailable`` (the store cannot answer now).

A counter per sender that resets an hour after its first message::

    sent = kv.incr("sent:" + str(envelope.sender), 1, ttl=3600)
"""

from wit_world.imports import kv as _host

Error_NotANumber = _host.Error_NotANumber
Error_TooLarge = _host.Error_TooLarge
Error_Unavailable = _host.Error_Unavailable


def _ms(ttl):
    return None if ttl is None else max(0, int(ttl * 1000))


def get(key):
    """The value of ``key`` (bytes), or ``None`` if absent or expired."""
    return _host.get(key)


def set(key, value, ttl=None):
    """Sets ``key`` to ``value`` (bytes, or text stored as UTF-8), expiring
    after ``ttl`` seconds if given."""
    if isinstance(value, str):
        value = value.encode()
    _host.set(key, value, _ms(ttl))


def delete(key):
    """Removes ``key``; returns whether it existed."""
    return _host.delete(key)


def incr(key, delta=1, ttl=None):
    """Atomically adds ``delta`` to the integer at ``key`` (absent counts as
    0) and returns the new value; ``ttl`` (seconds) applies when the key is
    created."""
    return _host.incr(key, delta, _ms(ttl))
