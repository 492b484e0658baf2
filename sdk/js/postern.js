// Write policy plugins for the Postern SMTP relay in JavaScript.
//
// A plugin is one class that extends `Plugin`, exported as the module's
// default. Every hook answers "no opinion" unless the class defines it, so
// a plugin writes only the hooks it needs, and the relay calls only those.
// Its `[plugin.config]` table arrives once, as an object, in the
// constructor:
//
//     import { Plugin, Verdict } from 'postern';
//
//     export default class Blocklist extends Plugin {
//       constructor(config) {
//         super(config);
//         this.domains = (config.domains ?? []).map((d) => d.toLowerCase());
//       }
//
//       rcpt(session, rcpt) {
//         if (this.domains.includes(rcpt.domain.toLowerCase())) {
//           return Verdict.reject(550, '5.7.1', 'recipient domain is blocked');
//         }
//         return Verdict.CONTINUE;
//       }
//     }
//
// Build it with `node sdk/js/build.mjs blocklist.js -o blocklist.wasm`, copy
// the `.wasm` into the relay's plugins folder and name it in a `[[plugin]]`
// table.
//
// The relay lends an instance for one hook call at a time, so the plugin's
// own memory is not a place for state between hooks: what a hook learns and
// a later one needs goes into `metadata`, which the relay keeps per session
// and per message (with the message in the spool, so a value set at `data`
// is there at `route`).
//
// Host interfaces (`log`, `kv`, `dns`) work when the relay's config grants
// them to the plugin. The component imports all of them whatever the plugin
// calls, so the relay loads it with any grants, and a call to one it was not
// granted ends the hook with the plugin's `on_error` answer and a log line
// naming the interface. A host call that fails throws an Error whose
// `payload` is the WIT error case (for example `{ tag: 'unavailable', val:
// 'timed out' }`).

import * as context from 'postern:relay/context@0.2.0';
import * as dnsHost from 'postern:relay/dns@0.2.0';
import * as kvHost from 'postern:relay/kv@0.2.0';
import * as logHost from 'postern:relay/log@0.2.0';
import * as metadataHost from 'postern:relay/metadata@0.2.0';

/** Thrown by a constructor for a config the plugin cannot use: the relay
 * refuses the load, logs the text and keeps the chain it had. */
export class ConfigError extends Error {}

/** An envelope address; the null reverse-path `<>` has both parts empty. */
export class Address {
  constructor(localPart, domain) {
    this.localPart = localPart;
    this.domain = domain;
  }

  /** Splits `local@domain` at the last `@`; `null` without one. The empty
   * string is the null reverse-path. */
  static parse(text) {
    if (text === '') return new Address('', '');
    const at = text.lastIndexOf('@');
    return at < 0 ? null : new Address(text.slice(0, at), text.slice(at + 1));
  }

  static from(record) {
    return new Address(record.localPart, record.domain);
  }

  /** True for the null reverse-path (bounces). */
  get isNull() {
    return this.localPart === '' && this.domain === '';
  }

  toString() {
    return this.isNull ? '' : `${this.localPart}@${this.domain}`;
  }
}

const reply = (code, enhanced, text) => ({ code, enhanced, text });

/** What a verdict hook answers. The relay checks that a reply's code fits
 * the verdict and that no CR or LF is in it. */
export const Verdict = Object.freeze({
  /** No opinion: the next plugin is asked, then the relay's default. */
  CONTINUE: Object.freeze({ tag: 'continue' }),
  /** Accept now (never opens relaying the access rules refuse). */
  ACCEPT: Object.freeze({ tag: 'accept' }),
  /** Refuse permanently (5xx). */
  reject: (code, enhanced, text) => ({ tag: 'reject', val: reply(code, enhanced, text) }),
  /** Refuse temporarily (4xx): the client retries. */
  tempfail: (code, enhanced, text) => ({ tag: 'tempfail', val: reply(code, enhanced, text) }),
  /** Reply (4xx or 5xx), then close the connection. */
  disconnect: (code, enhanced, text) => ({ tag: 'disconnect', val: reply(code, enhanced, text) }),
});

/** Where the route hook sends one recipient. */
export const Route = Object.freeze({
  /** The relay's smart host or MX lookup. */
  DEFAULT: Object.freeze({ tag: 'default' }),
  /** Drop the recipient silently; it counts as delivered. */
  DISCARD: Object.freeze({ tag: 'discard' }),
  /** Deliver to the mail hosts of `domain`. */
  mx: (domain) => ({ tag: 'mx', val: domain }),
  /** Deliver through `smtp://host:port` or `smtps://host:port`. */
  smarthost: (url) => ({ tag: 'smarthost', val: url }),
  /** File the message as `.eml` in this folder below the relay's local folder. */
  localFolder: (folder) => ({ tag: 'local-folder', val: folder }),
  /** Deliver through the relay's smart-host pool `name`
   * (`[delivery.pools.NAME]`; `pools()` lists them). */
  pool: (name) => ({ tag: 'pool', val: name }),
  /** Fail the recipient permanently (5xx): the sender gets a bounce. */
  reject: (code, enhanced, text) => ({ tag: 'reject', val: reply(code, enhanced, text) }),
  /** `route` with `sender` (an `Address`) as the envelope sender of the
   * delivery (a forwarder's SRS address, say): what the route hook may
   * return instead of a plain route. */
  withSender: (route, sender) => ({ route, sender }),
  /** A route from text, as the router plugin's config writes them: `mx`
   * (the relay's default), `mx:DOMAIN`, `smtp://...`, `smtps://...`,
   * `pool:NAME`, `local:FOLDER`, `discard` or `reject`. Throws a TypeError
   * for anything else. */
  parse(text) {
    if (text === 'mx') return Route.DEFAULT;
    if (text.startsWith('mx:')) return Route.mx(text.slice(3));
    if (text.startsWith('smtp://') || text.startsWith('smtps://')) return Route.smarthost(text);
    if (text.startsWith('pool:')) return Route.pool(text.slice(5));
    if (text.startsWith('local:')) return Route.localFolder(text.slice(6));
    if (text === 'discard') return Route.DISCARD;
    if (text === 'reject') return Route.reject(550, '5.1.2', 'no route to this recipient');
    throw new TypeError(
      `unknown route ${JSON.stringify(text)}: use mx, mx:DOMAIN, smtp://..., smtps://..., pool:NAME, local:FOLDER, discard or reject`,
    );
  },
});

/** Something the running hook is about, read from the relay the first time
 * the plugin looks at it, so a hook that does not look pays nothing. */
class FromHook {
  #fetch;
  #value;
  #fetched = false;

  constructor(fetch) {
    this.#fetch = fetch;
  }

  get value() {
    if (!this.#fetched) {
      this.#value = this.#fetch();
      this.#fetched = true;
    }
    return this.#value;
  }
}

function ipText(ip) {
  if (ip.tag === 'ipv4') return ip.val.join('.');
  // The full form, groups in hex; compare it as text only after normalizing.
  return ip.val.map((g) => g.toString(16)).join(':');
}

/** The client session of the running hook. */
export class Session extends FromHook {
  constructor(fetch = context.getSession) {
    super(fetch);
  }

  /** The client's address, as text (IPv6 groups in full). */
  get peerIp() {
    return ipText(this.value.peerIp);
  }

  /** The client's port. */
  get peerPort() {
    return this.value.peerPort;
  }

  /** The address of the listener the client connected to. */
  get localIp() {
    return ipText(this.value.localIp);
  }

  /** The listener's port. */
  get localPort() {
    return this.value.localPort;
  }

  /** The name given in HELO or EHLO, once given. */
  get helo() {
    return this.value.helo;
  }

  /** `{ version, cipher }` once the session is in TLS. */
  get tls() {
    return this.value.tls;
  }

  /** The authenticated user, once AUTH succeeded. */
  get authUser() {
    return this.value.authUser;
  }

  /** True when the built-in rules let this client relay anywhere. */
  get mayRelay() {
    return this.value.mayRelay;
  }
}

/** The envelope of the running hook's transaction. */
export class Envelope extends FromHook {
  constructor(fetch = context.getEnvelope) {
    super(fetch);
  }

  /** The reverse-path, an `Address` (null for bounces). */
  get sender() {
    return Address.from(this.value.sender);
  }

  /** The recipients, `Address`es. */
  get recipients() {
    return this.value.recipients.map(Address.from);
  }

  /** MAIL FROM parameters: `size` (a BigInt), `body`, `smtputf8`, `envid`. */
  get params() {
    return this.value.params;
  }
}

/** The recipient the running `rcpt`, `route` or `delivered` hook is about;
 * reads like an `Address`. */
export class Recipient extends FromHook {
  constructor(fetch = context.getRecipient) {
    super(fetch);
  }

  get localPart() {
    return this.value.localPart;
  }

  get domain() {
    return this.value.domain;
  }

  /** The recipient as an `Address`. */
  get address() {
    return Address.from(this.value);
  }

  toString() {
    return this.address.toString();
  }
}

/** A message's header section, as the route hook gets it: read from the
 * relay on first use, fields unfolded and trimmed. */
export class Headers extends FromHook {
  constructor(raw) {
    super(raw === undefined ? context.getHeaders : () => raw);
  }

  /** The section as the relay sent it (CRLF line ends). */
  get raw() {
    return this.value;
  }

  /** Every field in order, as `[name, value]`. */
  *[Symbol.iterator]() {
    let field = null;
    for (const line of this.value.split('\n').map((l) => l.replace(/\r$/, ''))) {
      if ((line.startsWith(' ') || line.startsWith('\t')) && field) {
        field[1] += line;
        continue;
      }
      if (field) yield [field[0], field[1].trim()];
      const colon = line.indexOf(':');
      field = colon < 0 ? null : [line.slice(0, colon).trim(), line.slice(colon + 1)];
    }
    if (field) yield [field[0], field[1].trim()];
  }

  /** The first field called `name` (case-insensitive), or `null`. */
  get(name) {
    const wanted = name.toLowerCase();
    for (const [n, v] of this) if (n.toLowerCase() === wanted) return v;
    return null;
  }

  /** Every field called `name` (case-insensitive), in order. */
  getAll(name) {
    const wanted = name.toLowerCase();
    return [...this].filter(([n]) => n.toLowerCase() === wanted).map(([, v]) => v);
  }
}

/** The running hook's envelope, read when first used. */
export function envelope() {
  return new Envelope();
}

/** The running hook's queue id: during `data` (the id the message will
 * have), `route` and `delivered`; `undefined` before. */
export function queueId() {
  return context.getQueueId();
}

/** The running hook's session facts (the WIT record), or `undefined` where
 * it has none (at `route` and `delivered`, a bounce the relay made itself). */
export function findSession() {
  return context.findSession();
}

/** The names of the relay's smart-host pools, so a constructor can refuse
 * a config that names one the relay does not have. */
export function pools() {
  return context.getPools();
}

/** What the plugin remembers about the session and the message, kept by the
 * relay (always available; no grant). Each plugin writes only its own keys;
 * `getFrom` reads another plugin's. A refused write throws an Error whose
 * `payload` says why (`too-large`, `no-scope`, `read-only` at `route` and
 * `delivered`, `invalid-key`). */
export const metadata = Object.freeze({
  SESSION: 'session',
  TRANSACTION: 'transaction',
  /** This plugin's value for `key` in `scope`, or `undefined`. */
  get: (scope, key) => metadataHost.get(scope, key),
  /** Sets this plugin's value for `key`. */
  set: (scope, key, value) => metadataHost.set(scope, key, value),
  /** Removes this plugin's value for `key`; returns whether there was one. */
  remove: (scope, key) => metadataHost.remove(scope, key),
  /** This plugin's keys in `scope`. */
  keys: (scope) => metadataHost.keys(scope),
  /** Another plugin's value, by its `[[plugin]] name` (read only). */
  getFrom: (plugin, scope, key) => metadataHost.getFrom(plugin, scope, key),
});

const ms = (ttl) => (ttl === undefined || ttl === null ? undefined : BigInt(Math.max(0, Math.round(ttl * 1000))));
const bytes = (value) => (typeof value === 'string' ? new TextEncoder().encode(value) : value);

/** The plugin's key-value store (grant `kv`): shared by all its instances
 * (and by every relay on the same Redis), values expire after their TTL (in
 * seconds here), `incr` is atomic. A failure throws an Error whose `payload`
 * is `{ tag: 'not-a-number' }`, `{ tag: 'too-large' }` or `{ tag:
 * 'unavailable', val }` (the store cannot answer now). */
export const kv = Object.freeze({
  /** The value of `key` (a Uint8Array), or `undefined`. */
  get: (key) => kvHost.get(key),
  /** Sets `key` to `value` (bytes, or text stored as UTF-8). */
  set: (key, value, ttl) => kvHost.set(key, bytes(value), ms(ttl)),
  /** Removes `key`; returns whether it existed. */
  delete: (key) => kvHost.delete(key),
  /** Atomically adds `delta` (default 1) to the integer at `key` and returns
   * the new value (a Number); `ttl` applies when the key is created. */
  incr: (key, delta = 1, ttl = undefined) => Number(kvHost.incr(key, BigInt(delta), ms(ttl))),
});

/** Writes to the relay's log, tagged with the plugin's name (grant `log`). */
export const log = Object.freeze({
  error: (message) => logHost.log('error', String(message)),
  warn: (message) => logHost.log('warn', String(message)),
  info: (message) => logHost.log('info', String(message)),
  debug: (message) => logHost.log('debug', String(message)),
});

/** DNS lookups through the relay's resolver (grant `dns`). A failure throws
 * an Error whose `payload` is `{ tag: 'not-found' }`, `{ tag: 'temporary',
 * val }` or `{ tag: 'invalid-name' }`. */
export const dns = Object.freeze({
  a: (name) => dnsHost.a(name),
  aaaa: (name) => dnsHost.aaaa(name),
  mx: (name) => dnsHost.mx(name),
  txt: (name) => dnsHost.txt(name),
  /** Records of `kind` ('a', 'aaaa', 'mx', 'txt', 'ptr') as text, with the
   * seconds they may be kept: `{ records, ttl }`; none for a name without
   * them or that does not exist. */
  query: (name, kind) => dnsHost.query(name, kind),
});

/** A policy plugin. Define the hooks you need; the others are never called.
 * A verdict hook that returns `undefined` has no opinion (`Verdict.CONTINUE`);
 * a route hook returns a `Route` (or `Route.withSender(route, sender)`), and
 * `undefined` leaves the route to the relay. An
 * exception a hook lets escape ends the call: the relay answers with the
 * plugin's `on_error` policy. */
export class Plugin {
  // eslint-disable-next-line no-unused-vars
  constructor(config) {}

  connect(session) {
    return Verdict.CONTINUE;
  }

  helo(session) {
    return Verdict.CONTINUE;
  }

  mailFrom(session, envelope) {
    return Verdict.CONTINUE;
  }

  rcpt(session, rcpt) {
    return Verdict.CONTINUE;
  }

  data(session, envelope, message) {
    return Verdict.CONTINUE;
  }

  route(envelope, rcpt, headers) {
    return Route.DEFAULT;
  }

  delivered(envelope, report) {}
}

/** Hook method names, by the hook the relay calls them for. */
const HOOKS = [
  ['connect', 'connect'],
  ['helo', 'helo'],
  ['mail-from', 'mailFrom'],
  ['rcpt', 'rcpt'],
  ['data', 'data'],
  ['route', 'route'],
  ['delivered', 'delivered'],
];

/** The hooks a plugin class defines itself (or inherits from a class other
 * than `Plugin`). */
export function hooksOf(cls) {
  return HOOKS.filter(([, method]) => cls.prototype[method] !== Plugin.prototype[method]).map(([hook]) => hook);
}

/** Message conveniences, as the Rust SDK has them: the first value of a
 * header field, and the parts that are attachments. */
export function firstHeader(message, name) {
  const values = message.header(name);
  return values.length ? values[0] : null;
}

export function attachments(message) {
  return message.parts().filter((p) => p.isAttachment);
}

/** The component's exports for the plugin class `cls`: what the entry
 * module that build.mjs generates exports. Not for plugins to call. */
export function bind(cls) {
  if (!(typeof cls === 'function' && cls.prototype instanceof Plugin)) {
    throw new TypeError('the plugin module must `export default` a class that extends Plugin');
  }
  // One plugin per instance: the relay calls `init` once, before any hook.
  let plugin = null;
  const verdict = (answer) => answer ?? Verdict.CONTINUE;
  return {
    init(config) {
      try {
        plugin = new cls(JSON.parse(config));
      } catch (e) {
        // A thrown string is the `err` of init's result: the relay logs it
        // as why the plugin did not load.
        throw e instanceof ConfigError ? e.message : `${e?.name ?? 'Error'}: ${e?.message ?? e}`;
      }
      return hooksOf(cls);
    },
    connect: () => verdict(plugin.connect(new Session())),
    helo: () => verdict(plugin.helo(new Session())),
    mailFrom: () => verdict(plugin.mailFrom(new Session(), new Envelope())),
    rcpt: () => verdict(plugin.rcpt(new Session(), new Recipient())),
    data: (message) => verdict(plugin.data(new Session(), new Envelope(), message)),
    route: () => {
      const answer = plugin.route(new Envelope(), new Recipient(), new Headers()) ?? Route.DEFAULT;
      return 'route' in answer ? answer : { route: answer, sender: undefined };
    },
    delivered: (report) => {
      plugin.delivered(new Envelope(), report);
    },
  };
}
