"""Tags mail by rules on its Subject and sender: a header and a class in the
message's metadata, a count per class in the kv store, and a route per class
at delivery. A rule may refuse the message instead.

    [[plugin]]
    name = "tagger-py"
    path = "tagger-py.wasm"
    grants = ["kv", "log"]
    [plugin.config]
    header = "X-Postern-Class"                      # the default
    [[plugin.config.rules]]
    class = "newsletter"
    subject = ["newsletter", "unsubscribe"]         # words in the Subject, any case
    senders = ["@lists.example.com", "news@shop.example"]   # an address, or @domain and its subdomains
    [[plugin.config.rules]]
    class = "junk"
    subject = ["lottery"]
    reject = true                                   # refused with 550 5.7.1 (and counted)
    [plugin.config.routes]
    newsletter = "local:bulk"                       # mx:DOMAIN, smtp://..., local:FOLDER, discard

The first rule that matches decides. The counter of class C is the kv key
`class:C`; the class is the transaction metadata key `class`, which other
plugins read with `get-from`.
"""

from postern import ConfigError, Err, Plugin, Route, Verdict, export, queue_id
from postern import kv, log, metadata

KEYS = {"header", "rules", "routes"}
RULE_KEYS = {"class", "subject", "senders", "reject"}


class Rule:
    def __init__(self, n, table):
        unknown = set(table) - RULE_KEYS
        if unknown:
            raise ConfigError(f"rules[{n}]: unknown key {sorted(unknown)[0]!r}")
        self.cls = table.get("class")
        if not isinstance(self.cls, str) or not self.cls or not self.cls.isprintable():
            raise ConfigError(f"rules[{n}].class: expected a name")
        self.subject = [w.lower() for w in table.get("subject", [])]
        self.senders = [s.lower() for s in table.get("senders", [])]
        self.reject = bool(table.get("reject", False))
        if not self.subject and not self.senders:
            raise ConfigError(f"rules[{n}]: give subject words or senders")

    def matches(self, subject, sender):
        if any(word in subject for word in self.subject):
            return True
        domain = sender.rpartition("@")[2]
        for s in self.senders:
            if s.startswith("@"):
                if domain == s[1:] or domain.endswith("." + s[1:]):
                    return True
            elif sender == s:
                return True
        return False


class Tagger(Plugin):
    def __init__(self, config):
        unknown = set(config) - KEYS
        if unknown:
            raise ConfigError(f"unknown key {sorted(unknown)[0]!r}")
        self.header = config.get("header", "X-Postern-Class")
        self.rules = [Rule(n, r) for n, r in enumerate(config.get("rules", []))]
        try:
            self.routes = {c: Route.parse(text) for c, text in config.get("routes", {}).items()}
        except ValueError as e:
            raise ConfigError(f"routes: {e}")

    def data(self, session, envelope, message):
        subject = (message.subject() or "").lower()
        sender = str(envelope.sender).lower()
        rule = next((r for r in self.rules if r.matches(subject, sender)), None)
        if rule is None:
            return Verdict.CONTINUE
        log.info(f"{queue_id()} from <{sender}>: {rule.cls}")
        try:
            kv.incr(f"class:{rule.cls}")
        except Err as e:
            # Redis down or slow: the message goes on uncounted.
            log.warn(f"class {rule.cls} not counted: {e.value}")
        if rule.reject:
            return Verdict.reject(550, "5.7.1", f"message refused as {rule.cls}")
        message.add_header(self.header, rule.cls)
        metadata.set(metadata.TRANSACTION, "class", rule.cls)
        return Verdict.CONTINUE

    def route(self, envelope, rcpt, headers):
        return self.routes.get(metadata.get(metadata.TRANSACTION, "class"), Route.DEFAULT)


export(Tagger)
