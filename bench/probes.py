"""What the machine does while a benchmark measures: CPU by process group and
by kind, the disk, the page cache; and a quiet moment to start in.

Needs root (cgroups, other processes' /proc files). Linux only.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import time
import uuid

MiB = 1024 * 1024


def process_cpu_seconds(pid):
    """CPU time of a process, its threads that have ended included (/proc/<pid>/stat)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid) -> list:
    """Every process below ``pid``."""
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            found += [int(child), *_descendants(int(child))]
    return found


def _own_cgroup_dir(controller) -> pathlib.Path | None:
    """This process's cgroup in the hierarchy of ``controller`` (cgroup v1), or in
    cgroup v2's (``controller`` ""); None if that hierarchy is not mounted."""
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller in controllers.split(",")) if controller else not controllers:
            break
    else:
        return None
    for mount in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, options = mount.split()[:4]
        if (kind == "cgroup" and controller in options.split(",")) if controller \
                else kind == "cgroup2":
            return pathlib.Path(where) / path.lstrip("/")
    return None


class CpuGroups:
    """CPU time of groups of processes, each a cgroup of its own below this
    process's (cgroup v1's cpuacct, or v2). A process put in a group takes
    its children along, those that daemonize too (ssh's kept connections).

    Empty (``usage()`` returns {}) where no cgroup can be made.
    """

    def __init__(self):
        self.base = None
        for controller, usage in (("cpuacct", "cpuacct.usage"), ("", "cpu.stat")):
            parent = _own_cgroup_dir(controller)
            if parent is None or not (parent / usage).exists():
                continue
            try:
                base = parent / f"gis-bench-{uuid.uuid4().hex[:8]}"
                base.mkdir()
            except OSError:
                continue
            self.base, self.parent, self.usage_file = base, parent, usage
            break
        self.groups = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _group(self, name) -> pathlib.Path | None:
        if self.base is None:
            return None
        if name not in self.groups:
            (self.base / name).mkdir()
            self.groups[name] = self.base / name
        return self.groups[name]

    def add(self, name, pid):
        """Put ``pid`` and what it already started in the group ``name``."""
        group = self._group(name)
        if group is None:
            return
        for each in [pid, *_descendants(pid)]:
            with contextlib.suppress(ProcessLookupError, OSError):
                (group / "cgroup.procs").write_text(str(each))

    def wrap(self, name, argv) -> list:
        """``argv``, run in the group ``name``."""
        group = self._group(name)
        if group is None:
            return argv
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"),
                *argv]

    def members(self) -> set:
        """The pids in the groups now."""
        return {int(pid) for group in self.groups.values()
                for pid in (group / "cgroup.procs").read_text().split()}

    def usage(self) -> dict:
        """CPU seconds used so far in each group."""
        used = {}
        for name, group in self.groups.items():
            text = (group / self.usage_file).read_text()
            used[name] = (int(text) / 1e9 if self.usage_file == "cpuacct.usage"
                          else int(text.split("usage_usec")[1].split()[0]) / 1e6)
        return used

    def close(self):
        if self.base is None:
            return
        for group in self.groups.values():
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # a process that outlived the cluster
                    (self.parent / "cgroup.procs").write_text(pid)
            group.rmdir()
        self.base.rmdir()
        self.base = None


def machine_cpu() -> dict:
    """Seconds of CPU the whole machine spent so far, by kind (/proc/stat's first line)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    cpu = {name: int(value) / os.sysconf("SC_CLK_TCK") for name, value in zip(names, values)}
    cpu["busy"] = sum(cpu[name] for name in ("user", "nice", "system", "irq", "softirq"))
    return cpu


def quiet_moment(longest=15.0, span=0.5, idle=0.75) -> float:
    """Wait, ``longest`` seconds at most, for ``span`` seconds in which the machine's
    CPUs were ``idle`` idle; return the idle fraction of the last span.

    On a shared machine, work that runs beside a measurement only ever slows it
    down; each measurement of a row starts the same way.
    """
    deadline = time.monotonic() + longest
    while True:
        before = machine_cpu()
        time.sleep(span)
        after = machine_cpu()
        spent = {key: after[key] - before[key] for key in after}
        total = spent["busy"] + spent["idle"] + spent["iowait"] + spent["steal"]
        fraction = (spent["idle"] + spent["iowait"]) / total if total else 1.0
        if fraction >= idle or time.monotonic() > deadline:
            return fraction


# The broker's processes (RabbitMQ runs in an Erlang VM).
BROKER_COMMANDS = {"beam.smp", "erl_child_setup", "epmd", "inet_gethost"}


def process_census() -> dict:
    """{pid: (kind, CPU seconds so far)} of every process on the machine; kind is
    "kernel" (kernel threads: writeback, softirq), "broker" or "process"."""
    census = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = pathlib.Path(entry.path, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 1:].split()
        pid, ppid = int(entry.name), int(fields[1])
        kind = ("kernel" if 2 in (pid, ppid) else "broker" if comm in BROKER_COMMANDS
                else "process")
        census[pid] = (kind, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return census


def disk_sectors(path) -> dict:
    """Sectors read and written so far by the block device that holds ``path``."""
    dev = os.stat(path).st_dev
    stat = pathlib.Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    if not stat.exists():
        return {}
    fields = stat.read_text().split()
    return {"read": int(fields[2]), "written": int(fields[6])}


def resident_fraction(path) -> float | None:
    """How much of a file is in the page cache (util-linux's fincore); None if unknown."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output",
                              "RES,SIZE", "--", str(path)], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    resident, size = int(out[0]), int(out[1])
    return resident / size if size else 1.0


def meminfo(key) -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class Window:
    """What the machine did between ``start()`` and ``stop()``.

    CPU seconds: of each process group (CpuGroups: the nodes' sshd and
    daemons, with what they started), of each daemon's own process, of the
    kernel's threads, the broker and this process, and of the rest of the
    machine ("others": other work on a shared machine, and whatever started
    and ended within the window outside the groups); the machine's busy,
    idle, softirq and steal time. The disk's reads and writes, the dirty page
    cache at either end, and how much of the image read was in it at the start.
    """

    def __init__(self, cluster, groups, quiet_wait=15.0):
        self.cluster, self.groups, self.quiet_wait = cluster, groups, quiet_wait

    def _sample(self):
        return {"groups": self.groups.usage(), "members": self.groups.members(),
                "daemons": {node.name: process_cpu_seconds(node.daemon.pid)
                            for node in self.cluster.nodes if node.daemon is not None},
                "machine": machine_cpu(), "census": process_census(),
                "disk": disk_sectors(self.cluster.base), "dirty": meminfo("Dirty")}

    def start(self, image=None):
        """Start measuring (after a quiet moment); ``image``: the file about to be read."""
        self.idle_before = quiet_moment(self.quiet_wait)
        self.resident = resident_fraction(image) if image else None
        self.before = self._sample()
        self.started = time.monotonic()
        return self.started

    def stop(self) -> dict:
        seconds = time.monotonic() - self.started
        after, before = self._sample(), self.before
        groups = {name: after["groups"][name] - before["groups"].get(name, 0.0)
                  for name in after["groups"]}
        machine = {key: after["machine"][key] - before["machine"][key]
                   for key in after["machine"]}
        outside = {"kernel": 0.0, "broker": 0.0, "bench": 0.0}
        grouped = before["members"] | after["members"]
        for pid, (kind, cpu) in after["census"].items():
            kind = "bench" if pid == os.getpid() else kind
            if kind in outside and pid not in grouped:
                # A thread the kernel started meanwhile (a writeback worker) counts whole.
                outside[kind] += cpu - before["census"].get(pid, (kind, 0.0))[1]
        disk = {key: (after["disk"][key] - before["disk"][key]) * 512 / MiB
                for key in after["disk"]}
        return {
            "seconds": seconds,
            "idle_before": self.idle_before,
            "image_resident_at_start": self.resident,
            "cpu_seconds": groups,
            "daemon_own_cpu_seconds": {
                name: after["daemons"][name] - before["daemons"][name]
                for name in after["daemons"] if name in before["daemons"]},
            "kernel_threads_cpu_seconds": outside["kernel"],
            "broker_cpu_seconds": outside["broker"],
            "bench_cpu_seconds": outside["bench"],
            # /proc/stat counts in ticks (10 ms), the groups to the nanosecond: on a
            # quiet machine the rest comes out a few ticks below nothing.
            "others_cpu_seconds": max(0.0, machine["busy"] - sum(groups.values())
                                      - outside["kernel"] - outside["broker"]
                                      - outside["bench"]),
            "machine_busy_cpu_seconds": machine["busy"],
            "machine_idle_seconds": machine["idle"] + machine["iowait"],
            "machine_softirq_seconds": machine["softirq"],
            "machine_steal_seconds": machine["steal"],
            "disk_read_mib": disk.get("read", 0.0),
            "disk_written_mib": disk.get("written", 0.0),
            "dirty_mib_at_start": before["dirty"] / MiB,
            "dirty_mib_at_end": after["dirty"] / MiB,
        }
