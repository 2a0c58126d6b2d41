#!/usr/bin/env python3
"""Compiles every kernel in kernels/*.cu with NVRTC (the library the daemon uses at start-up) for each given
architecture and prints one row per kernel: file, kernel, arch, registers, spills, shared memory (the last three
from ptxas -v when ptxas is available). Exits non-zero on any compile error, printing NVRTC's log and the file.
No GPU needed. Tooling only: the daemon compiles the same sources through cudarc.
Usage: nvrtc_check.py --nvrtc LIBNVRTC --include DIR [--ptxas PTXAS] [--arch sm_80 --arch sm_90] KERNEL_DIR"""
import argparse, ctypes, os, re, subprocess, sys, tempfile

NAME_RULE = re.compile(r"(_(f16|f32|bf16)$)|(^f(16|32)_to_f(16|32)$)")


def check(rc, lib, what):
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}")


def compile_one(lib, path, arch, includes):
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None), lib, "nvrtcCreateProgram")
    opts = [f"--gpu-architecture=compute_{arch[3:]}".encode(), b"--std=c++17", b"-lineinfo"] + [f"-I{d}".encode() for d in includes]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        return None, log.value.decode(errors="replace")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetPTX(prog, ptx), lib, "nvrtcGetPTX")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode(), log.value.decode(errors="replace")


def ptxas_info(ptxas, ptx, arch):
    """{kernel: (registers, spill bytes, shared bytes)} from ptxas -v."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        name = f.name
    try:
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", name, "-o", os.devnull], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ptxas failed: {out.stderr}")
    finally:
        os.unlink(name)
    info, cur = {}, None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            info[cur] = [0, 0, 0]
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            info[cur][1] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            info[cur][0] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            info[cur][2] = int(s.group(1)) if s else 0
    return info


def max_threads(ptx, name):
    """The .maxntid of a kernel's PTX entry (from __launch_bounds__), as threads per block; 0 when it has none."""
    at = ptx.find(f".entry {name}(")
    if at < 0:
        return 0
    head = ptx[at:ptx.find("{", at)]
    m = re.search(r"\.maxntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?", head)
    if not m:
        return 0
    n = 1
    for g in m.groups():
        n *= int(g) if g else 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", required=True)
    ap.add_argument("--include", action="append", default=[])
    ap.add_argument("--ptxas")
    ap.add_argument("--arch", action="append")
    ap.add_argument("--table", help="also write kernel, arch, registers, static shared bytes and .maxntid (0: none) "
                    "as tab-separated rows to this file (cuemu checks every launch against them)")
    ap.add_argument("dir")
    a = ap.parse_args()
    archs = a.arch or ["sm_80", "sm_90"]
    lib = ctypes.CDLL(a.nvrtc)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    files = sorted(f for f in os.listdir(a.dir) if f.endswith(".cu"))
    if not files:
        sys.exit(f"no .cu files in {a.dir}")
    print(f"NVRTC {major.value}.{minor.value}; {len(files)} kernel files; archs {' '.join(archs)}")
    print(f"{'file':<16} {'kernel':<26} {'arch':<6} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    failed, rows = 0, 0
    table = []
    for f in files:
        path = os.path.join(a.dir, f)
        names = re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)', open(path).read())
        if not names:
            print(f"{f}: no extern \"C\" __global__ kernels", file=sys.stderr)
            failed += 1
        for n in names:
            if not NAME_RULE.search(n):
                print(f"{f}: kernel {n} does not carry its dtype (_f16, _f32, _bf16)", file=sys.stderr)
                failed += 1
        for arch in archs:
            ptx, log = compile_one(lib, path, arch, [a.dir] + a.include)
            if ptx is None:
                print(f"NVRTC failed on {f} for {arch} (kernels {', '.join(names)}):\n{log}", file=sys.stderr)
                failed += 1
                continue
            info = ptxas_info(a.ptxas, ptx, arch) if a.ptxas else {}
            for n in names:
                if n not in ptx:
                    print(f"{f}: kernel {n} missing from the PTX", file=sys.stderr)
                    failed += 1
                r, s, m = info.get(n, ("-", "-", "-"))
                print(f"{f:<16} {n:<26} {arch:<6} {r:>5} {s:>8} {m:>7}")
                if n in info:
                    table.append(f"{n}\t{arch}\t{r}\t{m}\t{max_threads(ptx, n)}")
                rows += 1
    if failed:
        sys.exit(f"{failed} kernel problem(s)")
    if a.table:
        if not a.ptxas:
            sys.exit("--table needs --ptxas (registers and shared memory come from ptxas -v)")
        os.makedirs(os.path.dirname(os.path.abspath(a.table)), exist_ok=True)
        with open(a.table + ".tmp", "w") as t:
            t.write("# kernel\tarch\tregisters\tstatic shared bytes\tmax threads per block (.maxntid, 0: none); from tools/nvrtc_check.py\n")
            t.write("\n".join(table) + "\n")
        os.replace(a.table + ".tmp", a.table)
        print(f"wrote {a.table} ({len(table)} rows)")
    print(f"ok: {rows} kernel builds")


if __name__ == "__main__":
    main()
