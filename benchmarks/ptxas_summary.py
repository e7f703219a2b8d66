"""Per-kernel resource table from a build log compiled with NVCC_APPEND_FLAGS="-Xptxas -v"
(device_check.sh): registers, spill stores/loads, stack frame, static shared memory and barriers
for every entry function, with its demangled name (templates kept, parameter list dropped).

  python3 benchmarks/ptxas_summary.py BUILD_LOG [--width N]    (N = 0: names untruncated)
"""
import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
PROPS = re.compile(r"Function properties for (\S+)")
STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
BARRIERS = re.compile(r"used (\d+) barriers")
SMEM = re.compile(r"(\d+) bytes smem")


def parse(lines):
    """{(mangled name, arch): {regs, barriers, smem, stack, spill_st, spill_ld}}"""
    kernels, props, current, props_name = {}, {}, None, None
    for line in lines:
        m = ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            kernels[current] = {}
            continue
        m = PROPS.search(line)
        if m:
            props_name = m.group(1)
            continue
        m = STACK.search(line)
        if m and props_name:
            props[props_name] = dict(zip(("stack", "spill_st", "spill_ld"), map(int, m.groups())))
            continue
        m = USED.search(line)
        if m and current:
            k = kernels[current]
            k["regs"] = int(m.group(1))
            b, s = BARRIERS.search(line), SMEM.search(line)
            k["barriers"] = int(b.group(1)) if b else 0
            k["smem"] = int(s.group(1)) if s else 0
            current = None
    for (name, _), k in kernels.items():
        k.update(props.get(name, {}))
    return kernels


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def drop_parameters(name):
    """'void ns::kern<4, float>(float*, int)' -> 'ns::kern<4, float>'."""
    if name.startswith("void "):
        name = name[5:]
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i]
    return name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--width", type=int, default=160, help="truncate names to this many characters (0: never)")
    args = ap.parse_args()
    with open(args.log, errors="replace") as fh:
        kernels = parse(fh)
    if not kernels:
        print(f"no ptxas entry functions in {args.log} (built without -Xptxas -v, or no CUDA?)")
        return 1
    names = demangle(sorted({n for n, _ in kernels}))
    rows = sorted(kernels.items(), key=lambda kv: (-kv[1].get("regs", 0), names[kv[0][0]]))
    spilling = [r for r in rows if r[1].get("spill_st", 0) or r[1].get("spill_ld", 0)]
    print(f"# ptxas: {len(rows)} entry functions, {len(spilling)} with spills")
    print(f"{'regs':>5}{'spill st/ld':>13}{'stack':>7}{'smem':>7}{'bar':>4} {'arch':<7} kernel")
    for (mangled, arch), k in rows:
        name = drop_parameters(names[mangled])
        if args.width and len(name) > args.width:
            name = name[:args.width - 3] + "..."
        spill = f"{k.get('spill_st', '?')}/{k.get('spill_ld', '?')}"
        flag = " SPILL" if (k.get("spill_st", 0) or k.get("spill_ld", 0)) else ""
        print(f"{k.get('regs', '?'):>5}{spill:>13}{k.get('stack', '?'):>7}{k.get('smem', 0):>7}"
              f"{k.get('barriers', 0):>4} {arch:<7} {name}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
