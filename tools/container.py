"""A Debian 12 node booted by its own systemd, on this machine (the systemd tier).

``Container`` boots Debian 12's systemd as PID 1 of a ``systemd-nspawn``
container and runs commands in it; tests/test_systemd_tier.py installs the
package there with apt and drives it through ``systemctl`` and
``journalctl``. Needs root.

The root file system is made once by ``mmdebstrap --variant=minbase
bookworm`` with systemd, dbus, rsync, the ssh client and python3, with the
packages the .deb depends on (and recommends) downloaded into apt's cache,
so that ``apt install`` of the .deb resolves them from Debian's packages
without the network. It is kept in ``/var/cache/glance-image-sync-tests/``
under a name that changes with the recipe and the .deb's dependencies, and
never written to: each container boots an overlay of it of its own (about
0.5 s from start to a running system, rather than 5 to 10 s to unpack a
copy).

What this machine needs (it has no systemd as PID 1, no system bus and no
machined; its ``/run`` is no tmpfs):

* ``systemd-nspawn -D ROOT --register=no --keep-unit --boot
  --console=passive``: without ``--keep-unit`` nspawn fails with "Failed to
  open system bus";
* run inside ``unshare --mount --propagation private`` with a tmpfs mounted
  on ``/run`` first, so that nspawn leaves nothing in the host's ``/run``,
  and every mount it makes (and the overlay) goes when it ends;
* ``nsenter --target <its PID 1> --mount --uts --ipc --pid --cgroup`` to run
  a command inside.

The container shares the host's network: the broker on 127.0.0.1 and sshds
on loopback addresses are reachable from it. Units that would listen there
or wake up on their own (ssh, getty, apt's timers) are masked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile

from tools.lifecycle import Started
from tools.localcluster import _descendants, wait_for

CACHE = pathlib.Path("/var/cache/glance-image-sync-tests")
SUITE = "bookworm"
# python3 as on any Debian node; the libraries come with the package.
BASE_PACKAGES = ["systemd", "dbus", "rsync", "openssh-client", "python3"]
MASKED = ["ssh.service", "ssh.socket", "getty@.service", "console-getty.service",
          "apt-daily.timer", "apt-daily-upgrade.timer"]
# What commands inside see: nothing of this shell's environment.
INSIDE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "SYSTEMD_PAGER": "",
              "SYSTEMD_COLORS": "0", "HOME": "/root"}
BOOT_TIMEOUT = 60
STOP_TIMEOUT = 30


def recommends(deb) -> list:
    """The packages a .deb recommends (the first of each alternative)."""
    field = subprocess.run(["dpkg-deb", "-f", str(deb), "Recommends"], check=True,
                           capture_output=True, text=True, timeout=60).stdout
    return [item.split("|")[0].split("(")[0].strip() for item in field.split(",")
            if item.strip()]


def apt_install_argv(deb_inside: str, extra: list) -> list:
    """How the package is installed inside: Depends, and Recommends named one by one.

    Without --no-install-recommends apt would also bring what each dependency
    recommends (docutils, PIL, ...: a hundred packages more).
    """
    return ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o",
            "Dpkg::Options::=--force-unsafe-io", deb_inside, *extra]


def cached_root(deb) -> pathlib.Path:
    """The root file system for ``deb``'s tests (read-only: each container overlays it).

    Made by mmdebstrap (about 30 s) when missing, under a name that changes
    with the recipe and ``deb``'s dependencies; others are removed once no
    container uses them.
    """
    relations = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Recommends"],
                               check=True, capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\n".join([*_recipe(), *MASKED, relations]).encode()).hexdigest()
    root = CACHE / f"{SUITE}-{key[:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test run builds it; the others wait
        if not root.is_dir():
            _build_root(deb, root)
        for old in CACHE.glob(f"{SUITE}-*"):
            if old.is_dir() and old != root:
                _remove_unless_used(old)
    return root


def _recipe() -> list:
    return ["--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE]


def _build_root(deb, root) -> None:
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    inside = f"/root/{pathlib.Path(deb).name}"
    download = " ".join(apt_install_argv(inside, recommends(deb)))
    masks = " ".join(f'"$1"/etc/systemd/system/{unit}' for unit in MASKED)
    *options, suite = _recipe()
    argv = [
        "mmdebstrap", "--quiet", *options,
        # apt's lists and the downloaded packages stay: the package installs from them.
        "--skip=cleanup/apt/lists", "--skip=cleanup/apt/cache",
        f"--customize-hook=copy-in {deb} /root",
        f'--customize-hook=chroot "$1" {download} --download-only',
        f'--customize-hook=rm "$1"{inside}',
        f"--customize-hook=for unit in {masks}; do ln -s /dev/null $unit; done",
        suite, str(partial),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"mmdebstrap failed: {result.stderr[-3000:]}")
    partial.rename(root)


def _in_use(root) -> open:
    """A lock file held (shared) for as long as a container overlays ``root``."""
    lock = open(root.with_name(root.name + ".lock"), "w")  # noqa: SIM115 - held by the caller
    fcntl.flock(lock, fcntl.LOCK_SH)
    return lock


def _remove_unless_used(root) -> None:
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        shutil.rmtree(root, ignore_errors=True)
    root.with_name(root.name + ".lock").unlink(missing_ok=True)


class Container(Started):
    """A booted container; ``with Container(deb) as node:`` stops it and removes its root."""

    def __init__(self, deb, name="gis-node"):
        self.deb = pathlib.Path(deb)
        self.name = name
        self.base = pathlib.Path(tempfile.mkdtemp(prefix="gis-container-", dir="/var/tmp"))
        self.console = self.base / "console.log"
        self.launcher = None
        self.pid1 = None
        self._lower_lock = None

    # -- life --------------------------------------------------------------------------

    def start(self) -> Container:
        if os.geteuid() != 0:
            raise RuntimeError("a container needs root")
        for program in ("mmdebstrap", "systemd-nspawn", "unshare", "nsenter", "dpkg-deb"):
            if not shutil.which(program):
                raise RuntimeError(f"{program} is not installed (see tools/install-deps)")
        lower = cached_root(self.deb)
        self._lower_lock = _in_use(lower)
        for name in ("upper", "work", "root"):
            (self.base / name).mkdir()
        # The cached root stays as it is: the container writes to an overlay of
        # its own, mounted (with /run) in a mount namespace that ends with it.
        script = ('mount -t tmpfs -o mode=0755 tmpfs /run && '
                  'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" '
                  '"$2/root" && exec systemd-nspawn -D "$2/root" --register=no --keep-unit '
                  '--boot --console=passive --machine="$3"')
        with open(self.console, "wb") as console:
            self.launcher = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                 "launch", str(lower), str(self.base), self.name],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        self.pid1 = wait_for(self._find_pid1, BOOT_TIMEOUT, what="the container's PID 1")
        # "offline", or no answer, until its systemd listens; then --wait waits for
        # the boot to finish.
        wait_for(lambda: self._system_state() in ("initializing", "starting", "running",
                                                  "degraded"),
                 BOOT_TIMEOUT, what="the container's systemd")
        state = self._system_state("--wait")
        if state not in ("running", "degraded"):
            raise RuntimeError(f"the container did not boot ({state}): "
                               f"{self.console.read_text()[-2000:]}")
        return self

    def _system_state(self, *args) -> str:
        return self.run("systemctl", "is-system-running", *args, check=False,
                        timeout=BOOT_TIMEOUT).stdout.strip()

    def _find_pid1(self):
        if self.launcher.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited: {self.console.read_text()[-2000:]}")
        for pid in _descendants(self.launcher.pid):
            if _nspid(pid)[-1:] == [1] and len(_nspid(pid)) > 1:
                return pid
        return None

    def stop(self) -> None:
        """Shut the container down (its systemd stops every unit), then remove its files."""
        if self.launcher is not None and self.launcher.poll() is None:
            # nspawn turns SIGTERM into an orderly shutdown of the container's systemd.
            self.launcher.send_signal(signal.SIGTERM)
            try:
                self.launcher.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait()
        if self._lower_lock is not None:
            self._lower_lock.close()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- inside ------------------------------------------------------------------------

    def run(self, *argv, check=True, timeout=120, input=None) -> subprocess.CompletedProcess:
        """Run ``argv`` inside (as root), with a minimal environment; its result."""
        result = subprocess.run(
            ["nsenter", "--target", str(self.pid1), "--mount", "--uts", "--ipc", "--pid",
             "--cgroup", "--", *argv],
            env=INSIDE_ENV, capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result

    def systemctl(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit, prop) -> str:
        """One property of a unit, as ``systemctl show`` gives it."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def journal(self, *args) -> str:
        return self.run("journalctl", "--no-pager", *args).stdout

    def cursor(self) -> str:
        """The journal's current end, for ``journal("--after-cursor", ...)``."""
        out = self.run("journalctl", "--no-pager", "-n", "0", "--show-cursor").stdout
        return out.strip().rpartition("-- cursor: ")[2]

    def install(self, deb) -> subprocess.CompletedProcess:
        """``apt install`` a .deb from this machine, with what it depends on and recommends."""
        shutil.copy(deb, self.path("/root"))
        return self.run(*apt_install_argv(f"/root/{pathlib.Path(deb).name}", recommends(deb)),
                        timeout=600)

    def path(self, inside: str) -> pathlib.Path:
        """The host's path of a file inside (through its PID 1's view of its root)."""
        return pathlib.Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def host_pid(self, pid: int) -> int:
        """The host's pid of the container's process ``pid``."""
        namespace = os.readlink(f"/proc/{self.pid1}/ns/pid")
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (_nspid(int(entry.name))[-1:] == [pid]
                            and os.readlink(f"/proc/{entry.name}/ns/pid") == namespace):
                        return int(entry.name)
        raise LookupError(f"no process {pid} in the container")


def _nspid(pid: int) -> list:
    """The pids of ``pid`` in each pid namespace it is in, outermost first."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(field) for field in line.split()[1:]]
    return []

