#!/usr/bin/env python3
"""Lists Rust functions longer than a limit (default 100 lines) under the
given directories; exits 1 when there is one.

A function is `fn name` up to its body's matching closing brace; strings,
chars and comments are skipped while matching braces. Usage:
    tools/fn_lengths.py [--max N] DIR...
"""
import os
import re
import sys

FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def strip(src):
    """The source with comments, strings and chars blanked (newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(path):
    src = strip(open(path, encoding="utf-8").read())
    for m in FN.finditer(src):
        i = m.end()
        # the body's opening brace, unless the declaration ends first (`;`)
        depth_paren = 0
        while i < len(src):
            ch = src[i]
            if ch in "([<":
                depth_paren += 1
            elif ch in ")]>":
                depth_paren -= 1
            elif ch == ";" and depth_paren <= 0:
                i = -1
                break
            elif ch == "{" and depth_paren <= 0:
                break
            i += 1
        if i < 0 or i >= len(src):
            continue
        depth, j = 0, i
        while j < len(src):
            if src[j] == "{":
                depth += 1
            elif src[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        start = src.count("\n", 0, m.start()) + 1
        end = src.count("\n", 0, j) + 1
        yield m.group(1), start, end - start + 1


def main(argv):
    limit = 100
    if len(argv) > 1 and argv[0] == "--max":
        limit, argv = int(argv[1]), argv[2:]
    bad = []
    for d in argv or ["."]:
        for root, _, files in os.walk(d):
            for f in sorted(files):
                if f.endswith(".rs"):
                    p = os.path.join(root, f)
                    for name, line, n in functions(p):
                        if n > limit:
                            bad.append((n, f"{p}:{line} fn {name}: {n} lines"))
    for _, msg in sorted(bad, reverse=True):
        print(msg)
    if bad:
        print(f"{len(bad)} function(s) over {limit} lines", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
