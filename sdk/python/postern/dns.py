"""DNS lookups through the relay's resolver (grant ``dns``). A failure
raises :class:`postern.Err` whose ``value`` is ``Error_NotFound``,
``Error_Temporary`` or ``Error_InvalidName``."""

from wit_world.imports import dns as _host

MxRecord = _host.MxRecord
RecordType = _host.RecordType
Answer = _host.Answer
Error_NotFound = _host.Error_NotFound
Error_Temporary = _host.Error_Temporary
Error_InvalidName = _host.Error_InvalidName


def a(name):
    """IPv4 addresses of ``name``, as text."""
    return _host.a(name)


def aaaa(name):
    """IPv6 addresses of ``name``, as text."""
    return _host.aaaa(name)


def mx(domain):
    """MX records of ``domain`` (``preference``, ``exchange``)."""
    return _host.mx(domain)


def txt(name):
    """TXT records of ``name``, each with its strings joined."""
    return _host.txt(name)


def query(name, kind):
    """Records of ``kind`` (a :class:`RecordType`: ``A``, ``AAAA``, ``MX``,
    ``TXT``, ``PTR``) as text, with the seconds they may be kept (an
    :class:`Answer`: ``records``, ``ttl``); none for a name without them or
    that does not exist."""
    return _host.query(name, kind)
