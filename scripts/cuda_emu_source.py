#!/usr/bin/env python3
"""scripts/cuda_emu_source.py IN.cu OUT.cpp: a CUDA source as plain C++ for the CPU emulator
(tests/cuda_emu/cuda_runtime.h), so g++ compiles the real kernels.cu for build/run_tests_emu.

These rewrites, each keeping the line numbers (a #line directive names IN.cu, so compiler messages
and __FILE__/__LINE__ point into it):
  kernel<A, B><<<grid, block, smem, stream>>>(args)
      -> ::emu::launch(::emu::LaunchConfig(grid, block, smem, stream), "kernel<A, B>", BOUND, kernel<A, B>, args)
     where BOUND is the kernel's __launch_bounds__ expression (1024 without one); launches may span
     lines, sit inside macros, and name templates with commas;
  extern __shared__ [__align__(N)] T name[];  ->  T* name = ::emu::dynamic_shared<T>();
  __shared__ T name[D]...;  ->  static ::emu::Shared<T[D]...> name_emu_shared; auto& name = name_emu_shared.v;
  #pragma unroll [N]  ->  #pragma GCC unroll N (32 without N);
  #include "NAME.cuh" (a part of IN.cu kept in its own file)  ->  its text, rewritten too, between
     #line directives (the kernels it defines may be launched from IN.cu).
Comments and string literals are left alone. Anything it cannot parse is an error naming the line.
"""
import os
import re
import sys


def code_mask(text):
    """text with comments and string/char literals blanked (newlines kept): where to look for syntax."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def fail(path, text, pos, what):
    sys.exit(f"{path}:{line_of(text, pos)}: cuda_emu_source: {what}")


def match_forward(code, i):
    """Index just past the bracket closing the one at code[i]; -1 when unbalanced."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for j in range(i, len(code)):
        c = code[j]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                return -1
            if not stack:
                return j + 1
    return -1


def kernel_start(code, end):
    """Start of the kernel expression ending just before `end` (a name, maybe with template arguments)."""
    j = end
    while j > 0 and code[j - 1].isspace():
        j -= 1
    if j > 0 and code[j - 1] == ">":  # template arguments: back to the matching '<'
        depth = 0
        while j > 0:
            j -= 1
            c = code[j]
            if c in ">)":
                depth += 1
            elif c in "<(":
                depth -= 1
                if depth == 0:
                    break
        while j > 0 and code[j - 1].isspace():
            j -= 1
    while j > 0 and (code[j - 1].isalnum() or code[j - 1] in "_:"):
        j -= 1
    return j


def rewrite_launches(path, text, bounds):
    code = code_mask(text)
    out, last = [], 0
    for m in re.finditer(r"<<<", code):
        i = m.start()
        if i < last:
            continue
        k = kernel_start(code, i)
        kernel = text[k:i].strip()
        name = re.match(r"[\w:]+", kernel)
        if not name:
            fail(path, text, i, "no kernel name before <<<")
        # the configuration: up to the first >>> outside brackets
        depth, j = 0, i + 3
        while j < len(code):
            if code[j] in "([{":
                depth += 1
            elif code[j] in ")]}":
                depth -= 1
            elif depth == 0 and code.startswith(">>>", j):
                break
            j += 1
        else:
            fail(path, text, i, "no >>> after <<<")
        config = text[i + 3 : j]
        a = j + 3
        while a < len(code) and code[a].isspace():
            a += 1
        if a >= len(code) or code[a] != "(":
            fail(path, text, j, "no argument list after >>>")
        close = match_forward(code, a)
        if close < 0:
            fail(path, text, a, "unbalanced argument list")
        args = text[a + 1 : close - 1]
        base = name.group(0).split("::")[-1]
        bound = bounds.get(base, "1024")
        call = (f'::emu::launch(::emu::LaunchConfig({config}), "{" ".join(kernel.split())}", ({bound}), {kernel}'
                + (f", {args}" if args.strip() else "") + ")")
        call += "\n" * (text.count("\n", k, close) - call.count("\n"))  # keep the lines that follow in place
        out.append(text[last:k])
        out.append(call)
        last = close
    out.append(text[last:])
    return "".join(out)


LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\(((?:[^()]|\([^()]*\))*)\)\s*(\w+)\s*\(")
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([\w:<>\s\*]+?)\s*(\w+)\s*\[\s*\]\s*;")
SHARED = re.compile(r"__shared__\s+([\w:<>\s\*]+?)\s*(\w+)\s*((?:\[[^\]]*\]\s*)*);")


def rewrite(path, text):
    code = code_mask(text)
    bounds = {name: " ".join(expr.split()) for expr, name in LAUNCH_BOUNDS.findall(code)}
    # Each rewrite of a declaration keeps it on one line; positions come from the masked code.
    def sub(pattern, make, text):
        code = code_mask(text)
        out, last = [], 0
        for m in pattern.finditer(code):
            out.append(text[last : m.start()])
            out.append(make(m) + "\n" * text.count("\n", m.start(), m.end()))
            last = m.end()
        out.append(text[last:])
        return "".join(out)

    text = sub(EXTERN_SHARED, lambda m: f"{m.group(1).strip()}* {m.group(2)} = ::emu::dynamic_shared<{m.group(1).strip()}>();", text)
    text = sub(SHARED, lambda m: (f"static ::emu::Shared<{m.group(1).strip()}{''.join(m.group(3).split())}> {m.group(2)}_emu_shared; "
                                  f"auto& {m.group(2)} = {m.group(2)}_emu_shared.v;"), text)
    text = re.sub(r"^([ \t]*)#pragma\s+unroll\b[ \t]*(\d*)",
                  lambda m: f"{m.group(1)}#pragma GCC unroll {m.group(2) or 32}", text, flags=re.M)
    left = re.search(r"__shared__", code_mask(text))
    if left:
        fail(path, text, left.start(), "a __shared__ declaration this script does not understand")
    return rewrite_launches(path, text, bounds)


INCLUDE_PART = re.compile(r'^#include "([\w.]+\.cuh)"[ \t]*$', re.M)


def inline_parts(src, text):
    """The local .cuh files src includes, spliced in with #line directives (recursively)."""
    def splice(m):
        part = os.path.join(os.path.dirname(src), m.group(1))
        with open(part) as f:
            body = inline_parts(part, f.read())
        return f'#line 1 "{part}"\n{body.rstrip(chr(10))}\n#line {line_of(text, m.start()) + 1} "{src}"'
    return INCLUDE_PART.sub(splice, text)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: cuda_emu_source.py IN.cu OUT.cpp")
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        text = f.read()
    out = f'#line 1 "{src}"\n' + rewrite(src, inline_parts(src, text))
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        f.write(out)
    os.replace(tmp, dst)


if __name__ == "__main__":
    main()
