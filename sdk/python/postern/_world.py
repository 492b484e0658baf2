"""The component's exports: the relay's hook calls, turned into calls of the
exported :class:`postern.Plugin`. Imported by the entry module that
``build.py`` generates, not by plugins.

componentize-py links the guest's exports and libc into one symbol space,
where a world export called ``connect`` clashes with libc's ``connect``.
``build.py`` therefore builds against the world with every export renamed
``postern-NAME`` (hence the ``postern_`` methods here) and gives the exports
their names back in the finished component.
"""

import json

import wit_world
from componentize_py_types import Err

from . import ConfigError, Envelope, Headers, Recipient, Session, exported, hooks_of
from .values import Route, Routing, Verdict

# One plugin per instance: the relay calls `init` once, before any hook.
_plugin = None


def _verdict(answer):
    return Verdict.CONTINUE if answer is None else answer


class WitWorld(wit_world.WitWorld):
    def postern_init(self, config):
        global _plugin
        cls = exported()
        try:
            _plugin = cls(json.loads(config))
        except ConfigError as e:
            raise Err(str(e))
        except Exception as e:
            # The relay logs this text as why the plugin did not load.
            raise Err(f"{type(e).__name__}: {e}")
        return hooks_of(cls)

    def postern_connect(self):
        return _verdict(_plugin.connect(Session()))

    def postern_helo(self):
        return _verdict(_plugin.helo(Session()))

    def postern_mail_from(self):
        return _verdict(_plugin.mail_from(Session(), Envelope()))

    def postern_rcpt(self):
        return _verdict(_plugin.rcpt(Session(), Recipient()))

    def postern_data(self, message):
        return _verdict(_plugin.data(Session(), Envelope(), message))

    def postern_route(self):
        answer = _plugin.route(Envelope(), Recipient(), Headers())
        if answer is None:
            return Routing(Route.DEFAULT, None)
        return answer if isinstance(answer, Routing) else Routing(answer, None)

    def postern_delivered(self, report):
        _plugin.delivered(Envelope(), report)
