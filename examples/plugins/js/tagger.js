// Tags mail by rules on its Subject and sender: a header and a class in the
// message's metadata, a count per class in the kv store, and a route per
// class at delivery. A rule may refuse the message instead.
//
//     [[plugin]]
//     name = "tagger-js"
//     path = "tagger-js.wasm"
//     grants = ["kv", "log"]
//     [plugin.config]
//     header = "X-Postern-Class"                      # the default
//     [[plugin.config.rules]]
//     class = "newsletter"
//     subject = ["newsletter", "unsubscribe"]         # words in the Subject, any case
//     senders = ["@lists.example.com", "news@shop.example"]   # an address, or @domain and its subdomains
//     [[plugin.config.rules]]
//     class = "junk"
//     subject = ["lottery"]
//     reject = true                                   # refused with 550 5.7.1 (and counted)
//     [plugin.config.routes]
//     newsletter = "local:bulk"                       # mx:DOMAIN, smtp://..., local:FOLDER, discard
//
// The first rule that matches decides. The counter of class C is the kv key
// `class:C`; the class is the transaction metadata key `class`, which other
// plugins read with `get-from`.

import { ConfigError, Plugin, Route, Verdict, kv, log, metadata, queueId } from 'postern';

const KEYS = new Set(['header', 'rules', 'routes']);
const RULE_KEYS = new Set(['class', 'subject', 'senders', 'reject']);

class Rule {
  constructor(n, table) {
    const unknown = Object.keys(table).filter((k) => !RULE_KEYS.has(k)).sort();
    if (unknown.length) throw new ConfigError(`rules[${n}]: unknown key '${unknown[0]}'`);
    this.cls = table.class;
    if (typeof this.cls !== 'string' || !/^[\x21-\x7e]+$/.test(this.cls)) {
      throw new ConfigError(`rules[${n}].class: expected a name`);
    }
    this.subject = (table.subject ?? []).map((w) => w.toLowerCase());
    this.senders = (table.senders ?? []).map((s) => s.toLowerCase());
    this.reject = Boolean(table.reject);
    if (!this.subject.length && !this.senders.length) {
      throw new ConfigError(`rules[${n}]: give subject words or senders`);
    }
  }

  matches(subject, sender) {
    if (this.subject.some((word) => subject.includes(word))) return true;
    const domain = sender.slice(sender.lastIndexOf('@') + 1);
    return this.senders.some((s) =>
      s.startsWith('@') ? domain === s.slice(1) || domain.endsWith(`.${s.slice(1)}`) : sender === s,
    );
  }
}

export default class Tagger extends Plugin {
  constructor(config) {
    super(config);
    const unknown = Object.keys(config).filter((k) => !KEYS.has(k)).sort();
    if (unknown.length) throw new ConfigError(`unknown key '${unknown[0]}'`);
    this.header = config.header ?? 'X-Postern-Class';
    this.rules = (config.rules ?? []).map((r, n) => new Rule(n, r));
    this.routes = new Map();
    for (const [cls, text] of Object.entries(config.routes ?? {})) {
      try {
        this.routes.set(cls, Route.parse(text));
      } catch (e) {
        throw new ConfigError(`routes: ${e.message}`);
      }
    }
  }

  data(session, envelope, message) {
    const subject = (message.subject() ?? '').toLowerCase();
    const sender = envelope.sender.toString().toLowerCase();
    const rule = this.rules.find((r) => r.matches(subject, sender));
    if (!rule) return Verdict.CONTINUE;
    log.info(`${queueId()} from <${sender}>: ${rule.cls}`);
    try {
      kv.incr(`class:${rule.cls}`);
    } catch (e) {
      // Redis down or slow: the message goes on uncounted.
      log.warn(`class ${rule.cls} not counted: ${JSON.stringify(e.payload ?? String(e))}`);
    }
    if (rule.reject) return Verdict.reject(550, '5.7.1', `message refused as ${rule.cls}`);
    message.addHeader(this.header, rule.cls);
    metadata.set(metadata.TRANSACTION, 'class', rule.cls);
    return Verdict.CONTINUE;
  }

  route(envelope, rcpt, headers) {
    return this.routes.get(metadata.get(metadata.TRANSACTION, 'class')) ?? Route.DEFAULT;
  }
}
