"""CPU seconds per process of a command's process tree: where a `reflow run` spends the machine's cores.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/process_cpu.py -- .venv/bin/reflow run --preset toy2d --root /tmp/r
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/process_cpu.py -- .venv/bin/reflow run --preset toy2d --root /tmp/r --local

Linux only (reads /proc). Samples the tree every 0.2 s and keeps each process's last user + system time, so a child that exits
between samples loses at most its last 0.2 s. Prints one line per process (CPU s, pid, command), then the wall time
and the total, and a `RESULT {json}` line. The command's own output goes to --log. With `--every S`, each process
also gets its CPU seconds so far at every S seconds of wall time (when the helpers' CPU is spent: start-up or stages).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    except OSError:
        return ""


def _tree(root: int) -> dict[int, float]:
    """{pid: CPU seconds} of root and its descendants now."""
    stats = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d))) is not None}
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
            todo += [c for c, (ppid, _) in stats.items() if ppid == pid]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default="/dev/null", help="where the command's output goes")
    ap.add_argument("--every", type=float, default=0.0, help="also print each process's CPU so far every S seconds")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give the command to measure after --")
    t0 = time.perf_counter()
    with open(a.log, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        seen: dict[int, tuple[str, float]] = {}
        series: dict[int, list[tuple[float, float]]] = {}  # pid: [(wall s, CPU s so far)] at every --every seconds
        mark = a.every
        while proc.poll() is None:
            for pid, cpu in _tree(proc.pid).items():
                seen[pid] = (_cmdline(pid) or (seen[pid][0] if pid in seen else "?"), cpu)  # (a zombie's is empty)
            if a.every and (now := time.perf_counter() - t0) >= mark:
                for pid, (_, cpu) in seen.items():
                    series.setdefault(pid, []).append((round(now, 1), round(cpu, 2)))
                mark += a.every
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    rows = sorted(seen.items(), key=lambda kv: -kv[1][1])
    for pid, (what, cpu) in rows:
        print(f"{cpu:8.2f} s  {pid:>7}  {what}")
        if series.get(pid):
            print("          " + "  ".join(f"{t:g}s:{c:.1f}" for t, c in series[pid]))
    total = sum(cpu for _, cpu in seen.values())
    print(f"wall {wall:.2f} s, CPU {total:.2f} s, exit status {proc.returncode}")
    print("RESULT " + json.dumps({"wall_s": round(wall, 2), "cpu_s": round(total, 2), "returncode": proc.returncode,
                                  "processes": [{"cmd": w, "cpu_s": round(c, 2)} | ({"series": series[pid]} if
                                                series.get(pid) else {}) for pid, (w, c) in rows]}))


if __name__ == "__main__":
    main()
