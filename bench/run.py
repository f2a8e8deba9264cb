"""Run the benchmarks; write bench/results/latest.json and latest.md.

    make bench                     # everything, full size (about 20 minutes, root)
    python -m bench.run --quick    # small sizes, to try the harness
    python -m bench.run --only detection_latency fanout_throughput
    python -m bench.run --only idle_cost --merge  # one row again, the others kept
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from dataclasses import asdict

from bench import relaying, scenarios

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# Each scenario returns a Result, or a list of them (one row each).
ALL = {**scenarios.ALL, **relaying.SCENARIOS}
QUICK = {**scenarios.QUICK, **relaying.QUICK}


def disk_write_mb_per_s(size=512 * 1024 * 1024) -> float:
    """Sequential write, fsynced, where the clusters keep their stores (the temp dir)."""
    import tempfile
    block = os.urandom(8 * 1024 * 1024)
    with tempfile.TemporaryFile() as f:
        started = time.monotonic()
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        return size / (time.monotonic() - started) / 1e6


def machine() -> dict:
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True,
                                  timeout=30).stdout.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"

    cpu = next((line.split(":", 1)[1].strip() for line in
                pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    memory = next(int(line.split()[1]) // 1024 // 1024 for line in
                  pathlib.Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    broker = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True,
                            text=True).stdout.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores", "memory": f"{memory} GiB",
        "kernel": platform.release(), "python": platform.python_version(),
        "rabbitmq": broker or "unknown", "rsync": first_line(["rsync", "--version"]),
        "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
        "disk": f"disk {disk_write_mb_per_s():.0f} MB/s (sequential, fsynced)",
        "load_before": os.getloadavg()[0],
    }


def settle(below=0.5, longest=90.0) -> None:
    """Wait (a while at most) for the previous scenario's load to fade."""
    deadline = time.monotonic() + longest
    while os.getloadavg()[0] > below and time.monotonic() < deadline:
        time.sleep(2)


def markdown(results, info, started) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} on "
        f"{info['cpu']}, {info['memory']}, {info.get('disk', 'disk not measured')}, Linux "
        f"{info['kernel']}, Python {info['python']}, "
        f"RabbitMQ {info['rabbitmq']}, {info['rsync']} (all three nodes and the broker on "
        "this one machine).",
        "",
        *([f"Rows re-measured later: {', '.join(info['remeasured'])}.", ""]
          if info.get("remeasured") else []),
        "| what | measured | target | floor / baseline | |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(f"| {result.what} | {result.measured} | {result.target} | "
                     f"{result.comparison} | {'met' if result.ok else '**missed**'} |")
    return "\n".join(lines) + "\n"


README = RESULTS.parent.parent / "README.rst"
BEGIN, END = ".. bench table: begin", ".. bench table: end"


def rst_table(results, info, started) -> str:
    """The table as an RST list-table, for the README."""
    def cell(text):
        return text.replace("*", "\\*")

    lines = [
        f"Measured {time.strftime('%Y-%m-%d', time.localtime(started))} on {info['cpu']}, "
        f"{info['memory']}, {info.get('disk', 'disk not measured')}, Linux {info['kernel']}, "
        f"Python {info['python']}, RabbitMQ "
        f"{info['rabbitmq']}, {' '.join(info['rsync'].split())}, all three nodes and the "
        "broker on this one machine.",
        "",
        *([f"Rows re-measured later the same day: {', '.join(info['remeasured'])}.", ""]
          if info.get("remeasured") else []),
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - what",
        "     - measured",
        "     - target",
        "     - floor / baseline",
        "     - ",
    ]
    for result in results:
        lines += [f"   * - {cell(result.what)}", f"     - {cell(result.measured)}",
                  f"     - {cell(result.target)}", f"     - {cell(result.comparison)}",
                  f"     - {'met' if result.ok else '**missed**'}"]
    return "\n".join(lines)


def update_readme(results, info, started) -> None:
    text = README.read_text()
    head, _, rest = text.partition(BEGIN + "\n")
    _, _, tail = rest.partition(END + "\n")
    README.write_text(f"{head}{BEGIN}\n\n{rst_table(results, info, started)}\n\n{END}\n"
                      f"{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a quick try")
    parser.add_argument("--only", nargs="+", choices=sorted(ALL), default=None)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--readme", action="store_true",
                        help="also put the table in README.rst")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other rows of the last full run (with --only)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the benchmarks run a local cluster: run as root")
    info = machine()
    started = time.time()
    results = []
    for name in args.only or list(ALL):
        settle()
        print(f"[bench] {name} (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        rows = ALL[name](**(QUICK.get(name, {}) if args.quick else {}))
        for result in rows if isinstance(rows, list) else [rows]:
            print(f"[bench]   {result.measured}  (target {result.target}; "
                  f"{result.comparison})", flush=True)
            results.append(result)
    stem = "quick" if args.quick else "latest"
    if args.merge and (args.out / f"{stem}.json").exists():
        earlier = json.loads((args.out / f"{stem}.json").read_text())
        fresh = {result.name: result for result in results}
        results = [fresh.pop(row["name"], None) or scenarios.Result(**row)
                   for row in earlier["results"]] + list(fresh.values())
        info["merged_into_run_of"] = earlier["started"]
        info["remeasured"] = sorted(set(args.only or []))
    table = markdown(results, info, started)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    if args.readme:
        update_readme(results, info, started)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": info, "started": started, "quick": args.quick,
         "results": [asdict(result) for result in results]}, indent=2))
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
