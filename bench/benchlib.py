# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Helpers the booted-guest benchmarks share (bench/handover.py,
bench/migration.py): logging, reading a log, the guest images, whether a
socket listens."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VM = os.path.join(ROOT, "vm-images")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def tail(path, n=30):
    lines = read(path).splitlines()
    return f"--- {path} (last {min(n, len(lines))} lines) ---\n" + "\n".join(lines[-n:]) + "\n"


def images():
    """The guest kernel and initramfs (built by vm-images/images.sh if missing)."""
    out = subprocess.run([os.path.join(VM, "images.sh")], check=True, capture_output=True, text=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return got["KERNEL"], got["INITRD"]


def listening(path):
    """The unix socket `path` is in the listening state (/proc/net/unix)."""
    try:
        with open("/proc/net/unix") as f:
            for line in f.readlines()[1:]:
                p = line.split()
                if len(p) >= 8 and p[7] == path and int(p[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False
