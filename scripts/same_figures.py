#!/usr/bin/env python3
"""Check that two results.json files hold the same figures, timings and memory aside.

    scripts/same_figures.py A/results.json B/results.json

Two runs of one suite on one build (say, one machine against shards merged) must agree on
everything but what the machine and the moment decide: timings, resident memory, timing
warnings, where the reference was stored, the provenance and the shard records. Prints
each differing key and exits 1 when there is one.
"""
import json
import re
import sys

SKIP = re.compile(
    r"^\.(provenance|shards)"
    r"|\.latency(\.|$)|\.elapsed_s$"
    r"|\.memory\.(rss_start_bytes|peak_rss_bytes|built_rss_bytes)$"
    r"|\.reference_cache\.(path|reused)$"
)


def is_timing_warning(text):
    return "timings" in text or "outlier" in text


def differences(a, b, path=""):
    if SKIP.search(path):
        return
    if path.endswith(".warnings") and isinstance(a, list) and isinstance(b, list):
        a = [w for w in a if not is_timing_warning(w)]
        b = [w for w in b if not is_timing_warning(w)]
    if type(a) is not type(b):
        yield f"{path}: {a!r} against {b!r}"
    elif isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                if not SKIP.search(f"{path}.{key}"):
                    yield f"{path}.{key}: only in {'the first' if key in a else 'the second'}"
                continue
            yield from differences(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        if len(a) != len(b):
            yield f"{path}: {len(a)} items against {len(b)}"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {a!r} against {b!r}"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        a = json.load(f)
    with open(sys.argv[2]) as f:
        b = json.load(f)
    found = list(differences(a, b))
    for line in found:
        print(line)
    cases = len(a.get("cases", []))
    if found:
        print(f"{len(found)} figures differ")
        sys.exit(1)
    print(f"same figures: {cases} cases, every figure but timings and memory equal")


if __name__ == "__main__":
    main()
