#!/usr/bin/env python3
"""Builds a Python plugin into a Postern component.

usage: build.py PLUGIN.py -o OUT.wasm [--path DIR]...
       build.py --install-tools
       build.py --bindings DIR

PLUGIN.py is the module that ends with ``postern.export(YourPlugin)``;
the other modules of its folder, the folders given with --path and the
``postern`` package beside this script are importable from it. The
component is made with componentize-py, at the version requirements.txt
pins, which this script installs into its tools folder (``POSTERN_TOOLS``,
by default ``target/sdk-tools`` of this checkout) the first time it is
needed. A build whose inputs (the plugin folder's ``.py`` files, the SDK,
the WIT world and the pinned toolchain) have not changed since the last
one leaves OUT as it is.

The component imports the relay's WASI subset (no WASI HTTP: componentize-py
adds none) and every ``postern:relay`` interface of the world. It carries the
custom section ``postern:ungranted`` = ``trap``, so the relay links the
interfaces the plugin is not granted to functions that trap instead of
refusing to load it.

--bindings DIR writes the Python bindings of the world into DIR, for an
editor to read (the build generates its own).
"""

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

SDK = Path(__file__).resolve().parent
WIT = SDK.parent.parent / "wit" / "postern.wit"
REQUIREMENTS = SDK / "requirements.txt"

# Every world export is built as `postern-NAME` and renamed back (see
# postern/_world.py for why); the methods of postern._world.WitWorld follow.
PREFIX = "postern-"
# The marker the relay reads (host/src/plugins/ungranted.rs).
MARKER_SECTION = "postern:ungranted"
MARKER = b"trap"


class BuildError(Exception):
    pass


def tools_dir():
    default = SDK.parent.parent / "target" / "sdk-tools"
    return Path(os.environ.get("POSTERN_TOOLS", default)).resolve()


def componentize_py():
    """The pinned componentize-py, installed into a venv of its own (named by
    the pins' hash, so changing them installs the new set beside the old).
    A lock keeps two builds from installing at once; a file written last
    tells a whole install from one that was cut short."""
    pins = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    env = tools_dir() / f"python-{pins}"
    exe = env / "bin" / "componentize-py"
    done = env / ".installed"
    if done.exists():
        return exe
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f"python-{pins}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            print(f"installing {REQUIREMENTS.name} into {env}", file=sys.stderr)
            shutil.rmtree(env, ignore_errors=True)
            venv.EnvBuilder(with_pip=True).create(env)
            subprocess.run(
                [env / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check",
                 "--quiet", "--requirement", REQUIREMENTS],
                check=True,
            )
            done.write_text(REQUIREMENTS.read_text())
    return exe


def build_world(wit_dir):
    """The relay's WIT with the `plugin` world's exports named PREFIX+NAME."""
    text = WIT.read_text()
    start = text.find("\nworld plugin {")
    if start < 0:
        raise BuildError(f"{WIT} has no `world plugin`")
    head, world = text[:start], text[start:]
    world, n = re.subn(r"(?m)^(\s*export )([a-z][a-z0-9-]*):", rf"\g<1>{PREFIX}\g<2>:", world)
    if n == 0:
        raise BuildError(f"the plugin world of {WIT} exports nothing")
    wit_dir.mkdir(parents=True, exist_ok=True)
    (wit_dir / "postern.wit").write_text(head + world)
    return n


# The component binary format, as far as renaming exports needs it.

def read_u32(data, i):
    value = shift = 0
    while True:
        if i >= len(data) or shift > 28:
            raise BuildError("malformed LEB128 in the component")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def skip_s33(data, i):
    while data[i] & 0x80:
        i += 1
    return i + 1


def u32(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def skip_export_rest(body, i):
    """Past the sort index and the optional type ascription of an export."""
    i += 2 if body[i] == 0x00 else 1          # sort (core sorts have two bytes)
    _, i = read_u32(body, i)                  # index
    present = body[i]
    i += 1
    if present == 0x00:
        return i
    if present != 0x01:
        raise BuildError(f"unexpected export type flag {present:#x}")
    kind = body[i]
    i += 1
    if kind == 0x00:                          # core module: 0x11 typeidx
        return read_u32(body, i + 1)[1]
    if kind in (0x01, 0x04, 0x05):            # func, component, instance
        return read_u32(body, i)[1]
    if kind == 0x02:                          # value: eq index, or a value type
        bound = body[i]
        i += 1
        if bound == 0x00:
            return read_u32(body, i)[1]
        return i + 1 if 0x64 <= body[i] <= 0x7F else skip_s33(body, i)
    if kind == 0x03:                          # type: eq index, or sub resource
        bound = body[i]
        return read_u32(body, i + 1)[1] if bound == 0x00 else i + 1
    raise BuildError(f"unexpected export kind {kind:#x}")


def finish(component):
    """Strips PREFIX from the top-level export names and appends the marker
    section. Returns the new bytes and how many exports were renamed."""
    if component[:8] != b"\0asm\x0d\0\x01\0":
        raise BuildError("componentize-py did not write a component")
    out = bytearray(component[:8])
    renamed = 0
    i = 8
    while i < len(component):
        section = component[i]
        size, start = read_u32(component, i + 1)
        body = component[start:start + size]
        i = start + size
        if section == 11:
            count, j = read_u32(body, 0)
            new = bytearray(u32(count))
            for _ in range(count):
                tag = body[j]
                if tag not in (0x00, 0x01):
                    raise BuildError(f"unexpected export name encoding {tag:#x}")
                length, j = read_u32(body, j + 1)
                name = body[j:j + length].decode()
                j += length
                if name.startswith(PREFIX):
                    name = name[len(PREFIX):]
                    renamed += 1
                rest = j
                j = skip_export_rest(body, j)
                encoded = name.encode()
                new += bytes([tag]) + u32(len(encoded)) + encoded + body[rest:j]
            if j != len(body):
                raise BuildError("export section longer than its entries")
            body = bytes(new)
        out += bytes([section]) + u32(len(body)) + body
    name = MARKER_SECTION.encode()
    payload = u32(len(name)) + name + MARKER
    out += b"\x00" + u32(len(payload)) + payload
    return bytes(out), renamed


def python_files(folder):
    """The modules below a folder, without hidden folders and caches."""
    return sorted(
        p for p in folder.rglob("*.py")
        if not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)
    )


def inputs_hash(plugin, paths):
    """A hash of everything the component is made from."""
    h = hashlib.sha256()
    files = [Path(__file__).resolve(), REQUIREMENTS, WIT]
    for folder in [plugin.parent, SDK, *paths]:
        files += python_files(folder)
    for f in files:
        h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(plugin.stem.encode())
    return h.hexdigest()


def build(plugin, out, paths):
    plugin = plugin.resolve()
    module = plugin.stem
    if plugin.suffix != ".py" or not module.isidentifier():
        raise BuildError(f"{plugin}: expected a Python module file (NAME.py)")
    if module in ("postern", "wit_world", "_postern_main"):
        raise BuildError(f"{plugin}: a plugin module may not be called {module}")
    paths = [p.resolve() for p in paths]
    stamp = out.parent / f".{out.name}.inputs"
    digest = inputs_hash(plugin, paths)
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        print(f"{out}: up to date")
        return
    exe = componentize_py()
    with tempfile.TemporaryDirectory(prefix="postern-build-") as tmp:
        tmp = Path(tmp)
        exports = build_world(tmp / "wit")
        (tmp / "_postern_main.py").write_text(
            "# The component's entry: the plugin module registers its class with\n"
            "# postern.export; _world turns the relay's calls into calls of it.\n"
            f"import {module}  # noqa: F401\n"
            "from postern._world import WitWorld  # noqa: F401\n"
        )
        raw = tmp / "plugin.wasm"
        # Copies of the modules, not the folders themselves: the toolchain
        # writes bytecode caches into the folders it imports from.
        command = [exe, "--quiet", "-d", tmp / "wit", "-w", "plugin", "componentize", "_postern_main",
                   "-p", tmp]
        for n, folder in enumerate([plugin.parent, SDK, *paths]):
            copy = tmp / f"path{n}"
            for module in python_files(folder):
                (copy / module.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(module, copy / module.relative_to(folder))
            command += ["-p", copy]
        subprocess.run([*command, "-o", raw], check=True)
        data, renamed = finish(raw.read_bytes())
        if renamed != exports:
            raise BuildError(f"renamed {renamed} of the world's {exports} exports")
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.parent / f".{out.name}.tmp{os.getpid()}"
        staged.write_bytes(data)
        staged.rename(out)
    stamp.write_text(digest)
    print(f"{out}: {len(data)} bytes")


def bindings(folder):
    exe = componentize_py()
    with tempfile.TemporaryDirectory(prefix="postern-bindings-") as tmp:
        build_world(Path(tmp) / "wit")
        subprocess.run([exe, "-d", Path(tmp) / "wit", "-w", "plugin", "bindings", folder], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plugin", nargs="?", type=Path, help="the plugin module (NAME.py)")
    parser.add_argument("-o", "--output", type=Path, help="the component to write")
    parser.add_argument("--path", type=Path, action="append", default=[],
                        help="another folder of modules the plugin imports")
    parser.add_argument("--install-tools", action="store_true", help="install the toolchain and stop")
    parser.add_argument("--bindings", type=Path, metavar="DIR", help="write the world's bindings into DIR")
    args = parser.parse_args()
    try:
        if args.install_tools:
            print(componentize_py())
        elif args.bindings:
            bindings(args.bindings)
        elif args.plugin and args.output:
            build(args.plugin, args.output, args.path)
        else:
            parser.error("give PLUGIN.py and -o OUT.wasm, --install-tools or --bindings DIR")
    except (BuildError, subprocess.CalledProcessError, OSError) as e:
        sys.exit(f"build.py: {e}")


if __name__ == "__main__":
    main()
