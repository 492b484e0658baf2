#!/usr/bin/env python3
"""Hot reload time: from the first byte of a new plugin `.wasm` written into
the watched plugins folder to the relay's chain running it, so that new
sessions get it (the control socket behind `postern plugin list` reports the
new content hash).

    host/benches/reload_time.py FILE.wasm [ROUNDS]

Each round writes FILE with a custom section that makes it new to the relay
(a content hash never seen, so nothing is cached): the time covers the
debounce, reading, compiling, validating (instantiate, `init`) and the swap.
PLUGIN_CONFIG holds the `[plugin.config]` lines FILE needs; LOAD=1 keeps
Postfix's smtp-source sending through the relay (to smtp-sink) meanwhile;
PRECHECK=1 runs `postern plugin check --config` on each new file first (not
timed), as an operator would, which leaves it compiled in the relay's cache;
SHOWLOG=1 prints the relay's log at the end (its `plugin compiled` lines give
each compile time). Needs target/release/postern.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "..", "target"))
BIN = os.path.join(TARGET, "release", "postern")
LISTEN, SINK = "127.0.0.1:2597", "127.0.0.1:2627"


def leb128(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def variant(wasm, tag):
    """FILE plus a custom section naming `tag`: same code, new content hash."""
    name = b"postern-bench"
    payload = leb128(len(name)) + name + tag.encode()
    return wasm + b"\x00" + leb128(len(payload)) + payload


def loaded_hash(sock_path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data)[0]["hash"]
    except (OSError, ValueError, IndexError, KeyError):
        return None


def wait_for(sock_path, digest, limit=30.0):
    start = time.monotonic()
    while loaded_hash(sock_path) != digest:
        if time.monotonic() - start > limit:
            sys.exit(f"the relay did not load {digest[:12]} within {limit} s")
        time.sleep(0.002)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    wasm = open(sys.argv[1], "rb").read()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    work = tempfile.mkdtemp()
    procs = []
    try:
        plugins = os.path.join(work, "plugins")
        os.makedirs(plugins)
        config = os.path.join(work, "postern.toml")
        with open(config, "w") as f:
            f.write(
                f'[[listener]]\naddress = "{LISTEN}"\n[relay]\nnetworks = ["127.0.0.0/8"]\n'
                f'[delivery]\nsmarthost = "smtp://{SINK}"\n'
                '[plugins]\nwatch = true\ncache_dir = "cache"\n[log]\nlevel = "info"\n'
                '[[plugin]]\nname = "p"\npath = "p.wasm"\n[plugin.config]\n'
                + os.environ.get("PLUGIN_CONFIG", "")
                + "\n"
            )
        first = variant(wasm, "start")
        with open(os.path.join(plugins, "p.wasm"), "wb") as f:
            f.write(first)
        relay = subprocess.Popen([BIN, "serve", "--config", config], stderr=open(os.path.join(work, "log"), "w"))
        procs.append(relay)
        sock_path = os.path.join(work, "spool", "plugins.sock")
        wait_for(sock_path, hashlib.sha256(first).hexdigest())
        if os.environ.get("LOAD"):
            procs.append(subprocess.Popen(["smtp-sink", "-u", "nobody", SINK, "1024"]))
            load = "while smtp-source -s 10 -m 2000 -l 4096 -f a@b.test -t c@d.test %s; do :; done" % LISTEN
            procs.append(subprocess.Popen(["sh", "-c", load], start_new_session=True))
            time.sleep(1)
        took = []
        for r in range(rounds):
            new = variant(wasm, f"round {r} {time.time()}")
            digest = hashlib.sha256(new).hexdigest()
            if os.environ.get("PRECHECK"):
                staged = os.path.join(work, "staged", "p.wasm")
                os.makedirs(os.path.dirname(staged), exist_ok=True)
                with open(staged, "wb") as f:
                    f.write(new)
                subprocess.run([BIN, "plugin", "check", "--config", config, staged], check=True, stdout=subprocess.DEVNULL)
            start = time.monotonic()
            # Written in place, in chunks, as a copy or a linker writes it.
            with open(os.path.join(plugins, "p.wasm"), "wb") as f:
                for i in range(0, len(new), 65536):
                    f.write(new[i : i + 65536])
            wait_for(sock_path, digest)
            took.append(time.monotonic() - start)
            print(f"round {r + 1}: serving after {took[-1] * 1000:.0f} ms", flush=True)
            time.sleep(0.5)
        print(
            f"{len(wasm) / 1e6:.2f} MB: median {statistics.median(took) * 1000:.0f} ms, "
            f"max {max(took) * 1000:.0f} ms over {rounds} rounds" + (" under load" if os.environ.get("LOAD") else "")
        )
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM) if p.args[0] == "sh" else p.terminate()
            except ProcessLookupError:
                pass
            p.wait()
        if os.environ.get("SHOWLOG"):
            print(open(os.path.join(work, "log")).read())
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
