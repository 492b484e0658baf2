"""What hooks answer (verdicts, routes, replies) and envelope addresses, as
the relay's WIT types with constructors that read like the Rust SDK's."""

from wit_world.imports import types as _types

Reply = _types.Reply
Address = _types.Address
Routing = _types.Routing


class Verdict:
    """What a verdict hook answers.

    ``Verdict.CONTINUE`` (no opinion: the next plugin is asked, and after the
    last the relay's default applies), ``Verdict.ACCEPT``, and replies::

        Verdict.reject(550, "5.7.1", "no thanks")     # 5xx
        Verdict.tempfail(451, "4.7.1", "try later")   # 4xx: the client retries
        Verdict.disconnect(421, "4.7.0", "bye")       # reply, then close

    The relay checks that a reply's code fits the verdict and that no CR or
    LF is in it; an answer that fails the check gets the plugin's
    ``on_error`` policy.
    """

    CONTINUE = _types.Verdict_Continue()
    ACCEPT = _types.Verdict_Accept()

    @staticmethod
    def reject(code, enhanced, text):
        """Refuse permanently (5xx)."""
        return _types.Verdict_Reject(Reply(code, enhanced, text))

    @staticmethod
    def tempfail(code, enhanced, text):
        """Refuse temporarily (4xx)."""
        return _types.Verdict_Tempfail(Reply(code, enhanced, text))

    @staticmethod
    def disconnect(code, enhanced, text):
        """Reply (4xx or 5xx) and close the connection."""
        return _types.Verdict_Disconnect(Reply(code, enhanced, text))


class Route:
    """Where the route hook sends one recipient: ``Route.DEFAULT`` (the
    relay's smart host or MX lookup), ``Route.DISCARD``, or one of::

        Route.mx("example.net")                   # that domain's mail hosts
        Route.smarthost("smtp://relay.example:25")  # or smtps://
        Route.pool("outbound")                    # a [delivery.pools.NAME] of the relay
        Route.local_folder("archive")             # .eml files below the relay's local folder
        Route.reject(550, "5.1.2", "no route")    # the sender gets a bounce
        Route.parse("pool:outbound")              # the router plugin's syntax

    A route hook returns one of these, or one with the envelope sender its
    delivery should use (a forwarder's SRS address, say)::

        Route.smarthost("smtp://out.example:25").with_sender(Address("srs0=x", "fwd.example"))
    """

    DEFAULT = _types.Route_Default()
    DISCARD = _types.Route_Discard()

    @staticmethod
    def mx(domain):
        """Deliver to the mail hosts of ``domain``."""
        return _types.Route_Mx(domain)

    @staticmethod
    def smarthost(url):
        """Deliver through ``smtp://host:port`` or ``smtps://host:port``."""
        return _types.Route_Smarthost(url)

    @staticmethod
    def pool(name):
        """Deliver through the relay's smart-host pool ``name``
        (``[delivery.pools.NAME]``; :func:`postern.pools` lists them)."""
        return _types.Route_Pool(name)

    @staticmethod
    def local_folder(folder):
        """File the message as ``.eml`` in this folder below the relay's
        local delivery folder."""
        return _types.Route_LocalFolder(folder)

    @staticmethod
    def reject(code, enhanced, text):
        """Fail the recipient permanently (5xx): the sender gets a bounce."""
        return _types.Route_Reject(Reply(code, enhanced, text))

    @staticmethod
    def parse(text):
        """A route from text, as the router plugin's config writes them:
        ``mx`` (the relay's default), ``mx:DOMAIN``, ``smtp://...``,
        ``smtps://...``, ``pool:NAME``, ``local:FOLDER``, ``discard`` or
        ``reject``. Raises ``ValueError`` for anything else."""
        if text == "mx":
            return Route.DEFAULT
        if text.startswith("mx:"):
            return Route.mx(text[3:])
        if text.startswith(("smtp://", "smtps://")):
            return Route.smarthost(text)
        if text.startswith("pool:"):
            return Route.pool(text[5:])
        if text.startswith("local:"):
            return Route.local_folder(text[6:])
        if text == "discard":
            return Route.DISCARD
        if text == "reject":
            return Route.reject(550, "5.1.2", "no route to this recipient")
        raise ValueError(
            f"unknown route {text!r}: use mx, mx:DOMAIN, smtp://..., smtps://..., "
            "pool:NAME, local:FOLDER, discard or reject"
        )


def _with_sender(self, sender):
    """This route with ``sender`` (an :class:`Address`) as the envelope
    sender of the delivery."""
    return Routing(self, sender)


# Every route, as the Rust SDK's `Route::with_sender`.
for _case in (_types.Route_Default, _types.Route_Mx, _types.Route_Smarthost, _types.Route_LocalFolder,
              _types.Route_Discard, _types.Route_Reject, _types.Route_Pool):
    _case.with_sender = _with_sender


def _address_parse(text):
    """Splits ``local@domain`` at the last ``@``; ``None`` without one. The
    empty string is the null reverse-path."""
    if text == "":
        return Address("", "")
    local, at, domain = text.rpartition("@")
    return Address(local, domain) if at else None


def _address_str(self):
    return "" if self.is_null else f"{self.local_part}@{self.domain}"


# The WIT record, with what the Rust SDK's `Address` has.
Address.parse = staticmethod(_address_parse)
Address.is_null = property(lambda self: self.local_part == "" and self.domain == "")
Address.is_null.__doc__ = "True for the null reverse-path ``<>`` (bounces)."
Address.__str__ = _address_str
