#!/usr/bin/env python3
"""Compares the dynamic symbols exported by libmasa with the functions
declared MASA_API in the public headers: none missing, none extra; and,
given the version script, that every symbol carries the version node that
lists it (names of older nodes never move; the rest go to the newest node).

usage: check_symbols.py [--map masa.map] <libmasa.so> <header or directory>...
(a directory stands for every .h file in it: masa.h includes the others)
"""
import os
import re
import subprocess
import sys


def exported(lib):
    """{name: version node} of the library's defined dynamic symbols."""
    out = subprocess.run(["nm", "-D", "--defined-only", lib], check=True,
                         capture_output=True, text=True).stdout
    names = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TtWiV" and parts[1] != "t":
            name, _, version = parts[2].partition("@")
            if name.startswith("masa_"):
                names[name] = version.lstrip("@")
    return names


def version_nodes(map_path):
    """[(node, [names listed in it])] in file order; a wildcard is not a name."""
    text = re.sub(r"/\*.*?\*/", "", open(map_path, encoding="utf-8").read(),
                  flags=re.S)
    nodes = []
    for node, body in re.findall(r"(\w[\w.]*)\s*\{(.*?)\}", text, flags=re.S):
        listed = body.split("local:")[0]
        nodes.append((node, re.findall(r"\b(masa_\w+)\s*;", listed)))
    return nodes


def check_versions(exp, map_path):
    """Messages for symbols whose version node is not the expected one."""
    nodes = version_nodes(map_path)
    if not nodes:
        return [f"no version nodes found in {map_path}"]
    expected = {}
    for node, names in nodes:
        for name in names:
            expected.setdefault(name, node)
    newest = nodes[-1][0]
    problems = []
    for name, version in sorted(exp.items()):
        want = expected.get(name, newest)
        if version != want:
            problems.append(f"{name} has version '{version}', expected '{want}'")
    for name in sorted(set(expected) - set(exp)):
        problems.append(f"{name} is listed in {map_path} but not exported")
    return problems


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
    args = sys.argv[1:]
    map_path = None
    if len(args) >= 2 and args[0] == "--map":
        map_path, args = args[1], args[2:]
    if len(args) < 2:
        print(__doc__)
        return 2
    lib, paths = args[0], args[1:]
    exp, dec = exported(lib), declared(paths)
    missing, extra = sorted(dec - set(exp)), sorted(set(exp) - dec)
    print(f"{len(dec)} functions declared, {len(exp)} symbols exported")
    for name in missing:
        print(f"missing from the library: {name}")
    for name in extra:
        print(f"exported but not in the header: {name}")
    if not dec:
        print("no MASA_API declarations found in the header")
        return 1
    problems = check_versions(exp, map_path) if map_path else []
    for problem in problems:
        print(problem)
    if map_path and not problems:
        print(f"every symbol carries its version node from {map_path}")
    return 1 if missing or extra or problems else 0


if __name__ == "__main__":
    sys.exit(main())
