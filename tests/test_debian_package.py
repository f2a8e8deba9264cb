"""debian/ agrees with pyproject.toml: the same version, and every dependency a line.

The package itself is built, checked by lintian and installed on a real node by
the systemd tier (tests/test_systemd_tier.py); this only keeps the two
descriptions of the project from drifting apart (no root, no build).
"""

import pathlib
import re

import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Debian's name of a Python distribution where it is not python3-<name>.
DEBIAN_NAMES = {"python-daemon": "python3-daemon",
                "prometheus_client": "python3-prometheus-client"}


def debian_depends() -> dict:
    """{package: lower bound or None} of the binary package's Depends."""
    control = (ROOT / "debian/control").read_text()
    lines = [line for line in control.splitlines() if not line.startswith("#")]
    field = re.search(r"^Depends:\n((?: .*\n)+)", "\n".join(lines) + "\n", re.M).group(1)
    found = {}
    for item in field.split(","):
        match = re.fullmatch(r"\s*([\w.+${}:-]+)\s*(?:\(>= (?:\d+:)?([\w.~]+)\))?\s*", item)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_the_package_version_is_the_projects():
    changelog = (ROOT / "debian/changelog").read_text().splitlines()[0]
    version = re.match(r"glance-image-sync \(([^)]+)\)", changelog).group(1)
    # Debian sorts "~dev0" before the release, as PEP 440 sorts ".dev0".
    assert version.replace("~", ".") == PYPROJECT["project"]["version"]


def test_every_dependency_is_a_debian_dependency_with_the_same_lower_bound():
    depends = debian_depends()
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, lower = re.fullmatch(r"([\w.-]+)>=([\w.]+)(?:,<\d+)?", requirement).groups()
        package = DEBIAN_NAMES.get(name, f"python3-{name.lower()}")
        assert package in depends, f"debian/control does not depend on {package} ({name})"
        assert depends[package] == lower, (package, depends[package], lower)


def test_the_units_are_installed_from_the_tree_and_neither_enabled_nor_started():
    installed = (ROOT / "debian/glance-image-sync.install").read_text().split()
    units = sorted(f"systemd/{unit.name}" for unit in (ROOT / "systemd").iterdir())
    assert sorted(path for path in installed if path.startswith("systemd/")) == units
    assert "dh_installsystemd --no-enable --no-start" in (ROOT / "debian/rules").read_text()
