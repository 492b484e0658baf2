"""Write policy plugins for the Postern SMTP relay in Python.

A plugin is one class derived from :class:`Plugin`. Every hook answers
"no opinion" unless the class defines it, so a plugin writes only the hooks
it needs, and the relay calls only those. Its ``[plugin.config]`` table
arrives once, as a dict, in ``__init__``; :func:`export` hands the class to
the relay::

    from postern import Plugin, Verdict, ConfigError, export

    class Blocklist(Plugin):
        def __init__(self, config):
            self.domains = [d.lower() for d in config.get("domains", [])]

        def rcpt(self, session, rcpt):
            if rcpt.domain.lower() in self.domains:
                return Verdict.reject(550, "5.7.1", "recipient domain is blocked")
            return Verdict.CONTINUE

    export(Blocklist)

Build it with ``python3 sdk/python/build.py blocklist.py -o blocklist.wasm``,
copy the ``.wasm`` into the relay's plugins folder and name it in a
``[[plugin]]`` table.

The relay lends an instance of the plugin for one hook call at a time, so
the plugin's own memory is not a place for state between hooks: what a hook
learns and a later one needs goes into :mod:`postern.metadata`, which the
relay keeps per session and per message (with the message in the spool, so
a value set at ``data`` is there at ``route``).

Host interfaces (:mod:`postern.log`, :mod:`postern.kv`, :mod:`postern.dns`)
work when the relay's config grants them to the plugin. The component
imports all of them whatever the plugin calls, so the relay loads it with
any grants, and a call to one it was not granted ends the hook with the
plugin's ``on_error`` answer and a log line naming the interface. A host
call that fails raises :class:`Err`, whose ``value`` is the WIT error case.
"""

import ipaddress

from componentize_py_types import Err
from wit_world.imports import context as _context
from wit_world.imports import message as _message
from wit_world.imports import metadata as _metadata
from wit_world.imports import types as _types

from .values import Address, Reply, Route, Routing, Verdict

__all__ = [
    "Address",
    "ConfigError",
    "DeliveryOutcome",
    "DeliveryReport",
    "Envelope",
    "Err",
    "Headers",
    "Hook",
    "Message",
    "Plugin",
    "Recipient",
    "Reply",
    "Route",
    "Routing",
    "Scope",
    "Session",
    "Verdict",
    "envelope",
    "export",
    "find_session",
    "pools",
    "queue_id",
]

Hook = _types.Hook
Scope = _metadata.Scope
DeliveryReport = _types.DeliveryReport
DeliveryOutcome = _types.DeliveryOutcome
Message = _message.Message


class ConfigError(Exception):
    """Raised by ``__init__`` for a config the plugin cannot use: the relay
    refuses the load, logs the text and keeps the chain it had."""


class Plugin:
    """A policy plugin. Define the hooks you need; the others are never
    called. A verdict hook that returns ``None`` has no opinion, as
    :data:`Verdict.CONTINUE`; a route hook that returns ``None`` leaves the
    route to the relay, as :data:`Route.DEFAULT`.

    An exception a hook lets escape ends the call: the relay answers with
    the plugin's ``on_error`` policy (``tempfail`` unless configured).
    """

    def __init__(self, config):
        """Builds the plugin from its ``[plugin.config]`` table (a dict).
        Raise :class:`ConfigError` (or any exception) to refuse it."""

    def connect(self, session):
        """After the client connected, before the banner."""
        return Verdict.CONTINUE

    def helo(self, session):
        """After EHLO or HELO, with the name in ``session.helo`` (and again
        after the EHLO that follows STARTTLS)."""
        return Verdict.CONTINUE

    def mail_from(self, session, envelope):
        """At MAIL FROM; the envelope has the sender and no recipients yet."""
        return Verdict.CONTINUE

    def rcpt(self, session, rcpt):
        """At each RCPT TO, after the relay's access rules accepted it."""
        return Verdict.CONTINUE

    def data(self, session, envelope, message):
        """After the message, before the relay answers: read and edit
        ``message`` (a :class:`Message`)."""
        return Verdict.CONTINUE

    def route(self, envelope, rcpt, headers):
        """At delivery, per recipient: where it goes (a :class:`Route`, or
        one ``.with_sender(address)`` to change the envelope sender of the
        delivery). :mod:`postern.metadata` has what the transaction's hooks
        left (read only here)."""
        return Route.DEFAULT

    def delivered(self, envelope, report):
        """After each delivery attempt of each recipient (a
        :class:`DeliveryReport`), off the delivery path."""


#: Hook method names, by the hook the relay calls them for.
HOOKS = {
    Hook.CONNECT: "connect",
    Hook.HELO: "helo",
    Hook.MAIL_FROM: "mail_from",
    Hook.RCPT: "rcpt",
    Hook.DATA: "data",
    Hook.ROUTE: "route",
    Hook.DELIVERED: "delivered",
}

_exported = []


def export(cls):
    """Hands ``cls`` (a :class:`Plugin` subclass) to the relay. Call it once,
    at the end of the plugin's module; it returns the class, so it also
    works as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"export takes a Plugin subclass, not {cls!r}")
    if _exported:
        raise RuntimeError(f"export called twice ({_exported[0].__name__} and {cls.__name__})")
    _exported.append(cls)
    return cls


def exported():
    """The class given to :func:`export`; raises if there is none."""
    if not _exported:
        raise RuntimeError("no plugin exported: end the plugin module with postern.export(YourPlugin)")
    return _exported[0]


def hooks_of(cls):
    """The hooks a plugin class defines itself (or inherits from a class
    other than :class:`Plugin`), in the order of :class:`Hook`."""
    return [hook for hook, name in HOOKS.items() if getattr(cls, name) is not getattr(Plugin, name)]


_UNSET = object()


class _FromHook:
    """Something the running hook is about, read from the relay the first
    time the plugin looks at it, so a hook that does not look pays nothing."""

    __slots__ = ("_fetch", "_value")

    def __init__(self, fetch):
        self._fetch = fetch
        self._value = _UNSET

    def _get(self):
        if self._value is _UNSET:
            self._value = self._fetch()
        return self._value


def _ip(ip):
    if isinstance(ip, _types.IpAddress_Ipv4):
        return ipaddress.IPv4Address(bytes(ip.value))
    return ipaddress.IPv6Address(b"".join(group.to_bytes(2, "big") for group in ip.value))


class Session(_FromHook):
    """The client session of the running hook."""

    __slots__ = ()

    def __init__(self, fetch=_context.get_session):
        super().__init__(fetch)

    @property
    def peer_ip(self):
        """The client's address, an :class:`ipaddress.IPv4Address` or
        :class:`ipaddress.IPv6Address`."""
        return _ip(self._get().peer_ip)

    @property
    def peer_port(self):
        """The client's port."""
        return self._get().peer_port

    @property
    def local_ip(self):
        """The address of the listener the client connected to."""
        return _ip(self._get().local_ip)

    @property
    def local_port(self):
        """The listener's port."""
        return self._get().local_port

    @property
    def helo(self):
        """The name given in HELO or EHLO, once given, else ``None``."""
        return self._get().helo

    @property
    def tls(self):
        """TLS facts (``version``, ``cipher``) once the session is in TLS."""
        return self._get().tls

    @property
    def auth_user(self):
        """The authenticated user, once AUTH succeeded."""
        return self._get().auth_user

    @property
    def may_relay(self):
        """True when the built-in rules let this client relay anywhere."""
        return self._get().may_relay


class Envelope(_FromHook):
    """The envelope of the running hook's transaction (during ``rcpt``, the
    recipients accepted before this one)."""

    __slots__ = ()

    def __init__(self, fetch=_context.get_envelope):
        super().__init__(fetch)

    @property
    def sender(self):
        """The reverse-path, an :class:`Address` (null for bounces)."""
        return self._get().sender

    @property
    def recipients(self):
        """The recipients, a list of :class:`Address`."""
        return self._get().recipients

    @property
    def params(self):
        """MAIL FROM parameters: ``size``, ``body``, ``smtputf8``, ``envid``."""
        return self._get().params


class Recipient(_FromHook):
    """The recipient the running ``rcpt``, ``route`` or ``delivered`` hook is
    about; reads like an :class:`Address`."""

    __slots__ = ()

    def __init__(self, fetch=_context.get_recipient):
        super().__init__(fetch)

    @property
    def local_part(self):
        """The part before the ``@``."""
        return self._get().local_part

    @property
    def domain(self):
        """The part after the ``@``; compare it case-insensitively."""
        return self._get().domain

    @property
    def address(self):
        """The recipient as an :class:`Address`."""
        return self._get()

    def __str__(self):
        return str(self._get())


class Headers(_FromHook):
    """A message's header section, as the route hook gets it: read from the
    relay on first use, fields unfolded and trimmed.

    >>> h = Headers("Received: from a\\r\\n\\tby b\\r\\nSubject: hi\\r\\n")
    >>> h.get("subject"), h.get("received")
    ('hi', 'from a\\tby b')
    """

    __slots__ = ()

    def __init__(self, raw=None):
        super().__init__(_context.get_headers if raw is None else (lambda: raw))

    @property
    def raw(self):
        """The section as the relay sent it (CRLF line ends)."""
        return self._get()

    def __iter__(self):
        """Every field in order, as ``(name, value)``."""
        name, value = None, None
        for line in self._get().split("\n"):
            line = line.rstrip("\r")
            if line[:1] in (" ", "\t") and name is not None:
                value += line
                continue
            if name is not None:
                yield name, value.strip()
            name, sep, value = line.partition(":")
            if not sep:
                name = None
            else:
                name = name.strip()
        if name is not None:
            yield name, value.strip()

    def get(self, name):
        """The first field called ``name`` (case-insensitive), or ``None``."""
        return next((v for n, v in self if n.lower() == name.lower()), None)

    def get_all(self, name):
        """Every field called ``name`` (case-insensitive), in order."""
        return [v for n, v in self if n.lower() == name.lower()]


def envelope():
    """The running hook's envelope, read when first used."""
    return Envelope()


def find_session():
    """The running hook's session facts (the WIT record: ``peer_ip`` as
    numbers, ...), or ``None`` where it has none (at ``route`` and
    ``delivered``, a bounce the relay made itself). The ``session``
    argument of a hook reads them lazily and converts addresses."""
    return _context.find_session()


def pools():
    """The names of the relay's smart-host pools, so ``__init__`` can refuse
    a config that names one the relay does not have."""
    return _context.get_pools()


def queue_id():
    """The running hook's queue id: during ``data`` (the id the message will
    have), ``route`` and ``delivered``; ``None`` before."""
    return _context.get_queue_id()


def _first_header(self, name):
    """The first value of a header field, or ``None``."""
    values = self.header(name)
    return values[0] if values else None


def _attachments(self):
    """The parts that are attachments."""
    return [p for p in self.parts() if p.is_attachment]


def _read_raw_all(self, chunk=64 * 1024):
    """The whole message as received (headers and body, CRLF line ends),
    read in chunks; header edits are not in it."""
    out = bytearray()
    while True:
        data = self.read_raw(len(out), chunk)
        if not data:
            return bytes(out)
        out += data


# Conveniences on the relay's message resource, as the Rust SDK has them.
Message.first_header = _first_header
Message.attachments = _attachments
Message.read_raw_all = _read_raw_all
