"""Runner of the CPU training benchmarks (benches/dpo_cpu.sh, benches/sft_cpu.sh; see benches/cpu_bench_common.sh).

Starts `/usr/bin/time -v -o TV cmd...`, writes the command's stdout lines prefixed with the wall-clock time they
arrived, and every second the CPU (in cores) used by everything except the measured process tree, by the tree
itself, iowait, steal, and the tree's major page faults.
Usage: cpu_bench_runner.py STDOUT LOAD TV -- cmd...
"""
import os, subprocess, sys, threading, time
stdout_path, load_path, tv = sys.argv[1:4]
cmd = sys.argv[5:]  # after "--"
tick = os.sysconf("SC_CLK_TCK")

def machine():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v) - v[3] - v[4], v[4], v[7]  # busy (all but idle and iowait), iowait, steal

def tree():
    """CPU ticks (utime+stime+cutime+cstime), major and minor faults of this runner's process tree."""
    kids, info = {}, {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        kids.setdefault(int(f[1]), []).append(int(p))
        info[int(p)] = (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]), int(f[9]) + int(f[10]), int(f[7]) + int(f[8]))
    todo, tot = [os.getpid()], [0, 0, 0]  # the runner's own tree holds /usr/bin/time and the command
    while todo:
        p = todo.pop()
        tot = [a + b for a, b in zip(tot, info.get(p, (0, 0, 0)))]
        todo += kids.get(p, [])
    return tot

proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", tv] + cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
stop = threading.Event()

def sample():
    # one line per second: start end foreign_cores own_cores iowait_cores steal_cores own_major_faults own_minor_faults
    with open(load_path, "w") as lf:
        t0, (m0, w0, s0), (o0, j0, n0) = time.time(), machine(), tree()
        while not stop.wait(1.0):
            t1, (m1, w1, s1), (o1, j1, n1) = time.time(), machine(), tree()
            d = tick * (t1 - t0)
            lf.write(f"{t0:.3f} {t1:.3f} {max(0, (m1 - m0) - (o1 - o0)) / d:.3f} {(o1 - o0) / d:.3f} "
                     f"{(w1 - w0) / d:.3f} {(s1 - s0) / d:.3f} {max(0, j1 - j0)} {max(0, n1 - n0)}\n")
            lf.flush()
            t0, m0, w0, s0, o0, j0, n0 = t1, m1, w1, s1, o1, j1, n1

th = threading.Thread(target=sample, daemon=True)
th.start()
with open(stdout_path, "w") as out:
    for line in proc.stdout:
        out.write(f"{time.time():.3f} {line}")
        out.flush()
rc = proc.wait()
stop.set()
th.join()
sys.exit(rc)
