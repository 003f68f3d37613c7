#!/usr/bin/env python3
"""Regenerate the registry tables in README.md from `bench list WHAT --markdown`.

Each table sits between `<!-- bench list WHAT -->` and `<!-- end bench list -->`.
Run from the repository root after changing a registry:

    cargo build && python3 scripts/update_readme_tables.py

The integration test `readme_tables_come_from_the_registries` fails until this is run.
"""
import re
import subprocess
import sys

BENCH = sys.argv[1] if len(sys.argv) > 1 else "target/debug/bench"

def table(what: str) -> str:
    return subprocess.run([BENCH, "list", what, "--markdown"], check=True, capture_output=True, text=True).stdout

def main() -> None:
    text = open("README.md", encoding="utf-8").read()
    pattern = re.compile(r"(<!-- bench list (\w+) -->\n)(.*?)(<!-- end bench list -->)", re.S)
    new = pattern.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)
    open("README.md", "w", encoding="utf-8").write(new)

if __name__ == "__main__":
    main()
