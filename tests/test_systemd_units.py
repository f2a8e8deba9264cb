"""The unit files: systemd-analyze verify says nothing, security rates them OK."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

UNITS = pathlib.Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ["glance-image-sync.service", "glance-image-sync-oneshot.service"]


@pytest.fixture(scope="module")
def installed_units(tmp_path_factory):
    """The units as installed: ExecStart pointing at this environment's command.

    verify checks that the program exists; everything else is byte for byte.
    """
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing (Debian package systemd; see tools/install-deps)")
    program = pathlib.Path(sys.executable).with_name("glance-image-sync")
    assert program.exists(), program
    target = tmp_path_factory.mktemp("units")
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/usr/bin/glance-image-sync", str(program))
        (target / unit.name).write_text(text)
    return target


def test_systemd_analyze_verify_has_nothing_to_say(installed_units):
    # verify exits 0 even on unknown keys: any output at all is a failure.
    result = subprocess.run(["systemd-analyze", "verify", *sorted(
        str(p) for p in installed_units.iterdir())], capture_output=True, text=True,
        cwd=installed_units)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("service", SERVICES)
def test_security_exposure_is_ok_or_better(installed_units, service):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true",
                             str(installed_units / service)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0 and match.group(2) in ("OK", "SAFE"), match.group(0)


@pytest.mark.parametrize("service", SERVICES)
def test_services_run_as_glance_with_a_read_only_system(service):
    text = (UNITS / service).read_text()
    for line in ["User=glance", "ProtectSystem=strict", "ReadWritePaths=/var/lib/glance/images",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "StateDirectory=glance-image-sync"]:
        assert line in text.splitlines(), line


def test_the_daemon_unit_is_type_notify_with_a_watchdog():
    lines = (UNITS / "glance-image-sync.service").read_text().splitlines()
    for line in ["Type=notify", "Restart=on-failure", "NotifyAccess=main"]:
        assert line in lines, line
    assert any(line.startswith("WatchdogSec=") for line in lines)


def test_the_timer_runs_the_oneshot_every_five_minutes():
    text = (UNITS / "glance-image-sync-oneshot.timer").read_text()
    assert "OnUnitActiveSec=5min" in text and "Unit=glance-image-sync-oneshot.service" in text
    service = (UNITS / "glance-image-sync-oneshot.service").read_text()
    assert "Type=oneshot" in service
    assert "glance-image-sync.conf both\n" in service
