#!/usr/bin/env node
// Builds a JavaScript plugin into a Postern component.
//
// usage: node build.mjs PLUGIN.js -o OUT.wasm
//        node build.mjs --install-tools
//
// PLUGIN.js `export default`s a class that extends `Plugin`, imported from
// 'postern' (this folder's postern.js); the other modules of its folder are
// importable from it by relative paths. The component is made with
// componentize-js, at the version package-lock.json pins, which this script
// installs into its tools folder (POSTERN_TOOLS, by default target/sdk-tools
// of this checkout) the first time it is needed. A build whose inputs (the
// plugin folder's modules, the SDK, the WIT world and the pinned toolchain)
// have not changed since the last one leaves OUT as it is.
//
// componentize-js is told to leave out WASI HTTP (`http`, `fetch-event`),
// which the relay does not offer; the component imports the rest of the
// relay's WASI subset and every `postern:relay` interface of the world. It
// carries the custom section `postern:ungranted` = `trap`, so the relay links
// the interfaces the plugin is not granted to functions that trap instead of
// refusing to load it.

import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const SDK = path.dirname(fileURLToPath(import.meta.url));
const WIT = path.resolve(SDK, '../../wit/postern.wit');
const LOCK = path.join(SDK, 'package-lock.json');
// Features of componentize-js that need WASI HTTP.
const DISABLED = ['http', 'fetch-event'];
// The marker the relay reads (host/src/plugins/ungranted.rs).
const MARKER_SECTION = 'postern:ungranted';
const MARKER = 'trap';
const SOURCES = /\.(js|mjs)$/;

class BuildError extends Error {}

function toolsDir() {
  return path.resolve(process.env.POSTERN_TOOLS ?? path.resolve(SDK, '../../target/sdk-tools'));
}

/** The pinned componentize-js, installed with `npm ci` into a folder named
 * by the lockfile's hash; installed beside it first and renamed into place,
 * so a folder under that name is always a whole install. */
function toolchain() {
  const pins = createHash('sha256').update(fs.readFileSync(LOCK)).digest('hex').slice(0, 12);
  const dir = path.join(toolsDir(), `js-${pins}`);
  const entry = path.join(dir, 'node_modules/@bytecodealliance/componentize-js/src/componentize.js');
  if (fs.existsSync(entry)) return entry;
  console.error(`installing ${path.basename(LOCK)} into ${dir}`);
  const staging = `${dir}.tmp${process.pid}`;
  fs.rmSync(staging, { recursive: true, force: true });
  fs.mkdirSync(staging, { recursive: true });
  for (const f of ['package.json', 'package-lock.json']) fs.copyFileSync(path.join(SDK, f), path.join(staging, f));
  const npm = spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: staging, stdio: 'inherit' });
  if (npm.status !== 0) throw new BuildError(`npm ci failed in ${staging}`);
  try {
    fs.renameSync(staging, dir);
  } catch (e) {
    // Another build installed it meanwhile.
    fs.rmSync(staging, { recursive: true, force: true });
    if (!fs.existsSync(entry)) throw e;
  }
  return entry;
}

/** The modules of a plugin folder, relative to it (no hidden folders, no
 * node_modules). */
function sources(folder, under = '') {
  const out = [];
  for (const e of fs.readdirSync(path.join(folder, under), { withFileTypes: true })) {
    const rel = path.join(under, e.name);
    if (e.name.startsWith('.') || e.name === 'node_modules') continue;
    if (e.isDirectory()) out.push(...sources(folder, rel));
    else if (SOURCES.test(e.name)) out.push(rel);
  }
  return out.sort();
}

function inputsHash(plugin) {
  const h = createHash('sha256');
  const folder = path.dirname(plugin);
  const files = [fileURLToPath(import.meta.url), path.join(SDK, 'postern.js'), LOCK, WIT];
  files.push(...sources(folder).map((f) => path.join(folder, f)));
  for (const f of files) h.update(`${f}\0`).update(fs.readFileSync(f)).update('\0');
  h.update(path.basename(plugin));
  return h.digest('hex');
}

function leb(n) {
  const out = [];
  do {
    let byte = n & 0x7f;
    n >>>= 7;
    if (n) byte |= 0x80;
    out.push(byte);
  } while (n);
  return Buffer.from(out);
}

/** A custom section: id 0, size, name, payload. */
function customSection(name, payload) {
  const body = Buffer.concat([leb(Buffer.byteLength(name)), Buffer.from(name), Buffer.from(payload)]);
  return Buffer.concat([Buffer.from([0]), leb(body.length), body]);
}

async function build(plugin, out) {
  plugin = path.resolve(plugin);
  out = path.resolve(out);
  if (!SOURCES.test(plugin) || !fs.existsSync(plugin)) throw new BuildError(`${plugin}: expected a JavaScript module file`);
  const stamp = path.join(path.dirname(out), `.${path.basename(out)}.inputs`);
  const digest = inputsHash(plugin);
  if (fs.existsSync(out) && fs.existsSync(stamp) && fs.readFileSync(stamp, 'utf8') === digest) {
    console.log(`${out}: up to date`);
    return;
  }
  const { componentize } = await import(pathToFileURL(toolchain()));
  const work = fs.mkdtempSync(path.join(tmpdir(), 'postern-build-'));
  const cwd = process.cwd();
  try {
    // The plugin's modules, with `from 'postern'` pointing at the SDK copy.
    const folder = path.dirname(plugin);
    for (const rel of sources(folder)) {
      const target = path.join(work, rel);
      fs.mkdirSync(path.dirname(target), { recursive: true });
      let sdk = path.relative(path.dirname(target), path.join(work, 'postern.js'));
      if (!sdk.startsWith('.')) sdk = `./${sdk}`;
      const text = fs.readFileSync(path.join(folder, rel), 'utf8');
      fs.writeFileSync(target, text.replace(/(\bfrom\s*|\bimport\s*\(?\s*)(['"])postern\2/g, `$1$2${sdk}$2`));
    }
    fs.copyFileSync(path.join(SDK, 'postern.js'), path.join(work, 'postern.js'));
    const entry = path.join(work, '_postern_main.js');
    fs.writeFileSync(
      entry,
      `// The component's entry: the relay's calls, turned into calls of the plugin class.\n` +
        `import Plugin from ${JSON.stringify(`./${path.relative(folder, plugin)}`)};\n` +
        `import { bind } from './postern.js';\n` +
        `export const { init, connect, helo, mailFrom, rcpt, data, route, delivered } = bind(Plugin);\n`,
    );
    // componentize-js maps the working folder as the component's `/` while
    // it pre-initializes the modules.
    process.chdir(work);
    const { component } = await componentize({
      sourcePath: entry,
      witPath: WIT,
      worldName: 'plugin',
      disableFeatures: DISABLED,
    });
    const data = Buffer.concat([Buffer.from(component), customSection(MARKER_SECTION, MARKER)]);
    fs.mkdirSync(path.dirname(out), { recursive: true });
    const staged = path.join(path.dirname(out), `.${path.basename(out)}.tmp${process.pid}`);
    fs.writeFileSync(staged, data);
    fs.renameSync(staged, out);
    fs.writeFileSync(stamp, digest);
    console.log(`${out}: ${data.length} bytes`);
  } finally {
    process.chdir(cwd);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

async function main(args) {
  if (args.length === 1 && args[0] === '--install-tools') {
    console.log(toolchain());
    return;
  }
  const o = args.indexOf('-o');
  if (args.length !== 3 || o < 0 || o === args.length - 1) {
    throw new BuildError('usage: node build.mjs PLUGIN.js -o OUT.wasm | --install-tools');
  }
  const out = args[o + 1];
  const plugin = args.filter((_, i) => i !== o && i !== o + 1)[0];
  await build(plugin, out);
}

try {
  await main(process.argv.slice(2));
} catch (e) {
  console.error(`build.mjs: ${e instanceof BuildError ? e.message : e?.stack ?? e}`);
  process.exit(1);
}
