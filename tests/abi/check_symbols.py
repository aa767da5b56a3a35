#!/usr/bin/env python3
"""Compares the dynamic symbols exported by libmasa with the functions
declared MASA_API in the public headers: none missing, none extra.

usage: check_symbols.py <libmasa.so> <header or directory of headers>...
(a directory stands for every .h file in it: masa.h includes the others)
"""
import os
import re
import subprocess
import sys


def exported(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", lib], check=True,
                         capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TtWiV" and parts[1] != "t":
            names.add(parts[2].split("@")[0])
    return names


def headers(paths):
    for path in paths:
        if os.path.isdir(path):
            yield from sorted(os.path.join(path, name)
                              for name in os.listdir(path)
                              if name.endswith(".h"))
        else:
            yield path


def declared(paths):
    names = set()
    for header in headers(paths):
        text = open(header, encoding="utf-8").read()
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        names |= set(re.findall(r"MASA_API\b[^;{]*?\b(masa_\w+)\s*\(",
                                text))
    return names


def main():
    lib, paths = sys.argv[1], sys.argv[2:]
    exp, dec = exported(lib), declared(paths)
    missing, extra = sorted(dec - exp), sorted(exp - dec)
    print(f"{len(dec)} functions declared, {len(exp)} symbols exported")
    for name in missing:
        print(f"missing from the library: {name}")
    for name in extra:
        print(f"exported but not in the header: {name}")
    if not dec:
        print("no MASA_API declarations found in the header")
        return 1
    return 1 if missing or extra else 0


if __name__ == "__main__":
    sys.exit(main())
