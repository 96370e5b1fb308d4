#!/usr/bin/env python3
"""Lists Rust functions longer than a limit (default 100 lines) and source
files longer than another (default 600 lines) under the given directories;
exits 1 when there is one.

A function is `fn name` up to its body's matching closing brace, both lines
counted; strings, chars and comments are skipped while matching braces, so a
`fn` or a brace in them does not count. A closure counts as part of the
function around it; a nested `fn` is listed on its own and also counts in the
one around it. Usage:
    tools/fn_lengths.py [--max N] [--max-file N] DIR...
    tools/fn_lengths.py --self-test
"""
import os
import re
import sys

FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def ident_before(src, i):
    """Whether an identifier character precedes `i` (a `b` prefix of a raw
    byte string, `br"…"`, does not count)."""
    k = i - 1
    if k >= 0 and src[k] == "b":
        k -= 1
    return k >= 0 and (src[k].isalnum() or src[k] == "_")


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
        elif c == "r" and re.match(r'r#*"', src[i:i + 260]) and not ident_before(src, i):
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
    yield from functions_in(open(path, encoding="utf-8").read())


def functions_in(text):
    """(name, first line, lines) of each function with a body in `text`."""
    src = strip(text)
    for m in FN.finditer(src):
        i = m.end()
        # the body's opening brace, unless the declaration ends first (`;`)
        depth_paren = 0
        while i < len(src):
            ch = src[i]
            if src.startswith("->", i):  # not a closing `>`
                i += 2
                continue
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


SELF_TEST = r'''
// fn in_comment() { }
/* fn in_block() {
} */
fn three() {
    let s = "fn in_string() { {";
    let r = r#"}"#;
    let b = br"\";
    let c = '}';
    let f = |x: u8| { x };
}
fn sig(g: fn() -> u8, h: fn() -> u8, a: [u8; 4]) -> Result<(), E> {
    fn nested() {
    }
}
trait T {
    fn decl(&self);
    fn with_default(&self) -> u8 { 1 }
}
fn generic<'a, T: Into<u8>>(x: &'a T) -> u8
where
    T: Copy,
{
    0
}
'''


def self_test():
    got = list(functions_in(SELF_TEST))
    want = [("three", 5, 7), ("sig", 12, 4), ("nested", 13, 2),
            ("with_default", 18, 1), ("generic", 20, 6)]
    if got != want:
        print(f"fn_lengths self-test failed:\n got  {got}\n want {want}", file=sys.stderr)
        return 1
    print("fn_lengths self-test ok")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    limit, file_limit = 100, 600
    while len(argv) > 1 and argv[0] in ("--max", "--max-file"):
        if argv[0] == "--max":
            limit = int(argv[1])
        else:
            file_limit = int(argv[1])
        argv = argv[2:]
    bad = []
    for d in argv or ["."]:
        for root, _, files in os.walk(d):
            for f in sorted(files):
                if f.endswith(".rs"):
                    p = os.path.join(root, f)
                    with open(p, encoding="utf-8") as fh:
                        lines = fh.read().count("\n")
                    if lines > file_limit:
                        bad.append((lines, f"{p}: file of {lines} lines"))
                    for name, line, n in functions(p):
                        if n > limit:
                            bad.append((n, f"{p}:{line} fn {name}: {n} lines"))
    for _, msg in sorted(bad, reverse=True):
        print(msg)
    if bad:
        print(f"{len(bad)} function(s) over {limit} lines or file(s) over {file_limit}", file=sys.stderr)
        return 1
    print(f"no function over {limit} lines, no file over {file_limit}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
