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
