"""Fail when line coverage is under a floor: for the package, and for any module.

    python -m tools.coverage_floor --total 85 --module 60

Reads the combined ``.coverage`` that ``pytest --cov`` left and prints the
package's figure and each module under the module floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import coverage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=float, required=True, help="floor for the package, %%")
    parser.add_argument("--module", type=float, required=True, help="floor for each module, %%")
    args = parser.parse_args(argv)
    cov = coverage.Coverage()
    cov.load()
    with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
        cov.json_report(outfile=report_file.name)
        report = json.load(open(report_file.name))  # noqa: SIM115 - closed with the file
    total = report["totals"]["percent_covered"]
    print(f"coverage: {total:.1f} % of the package's lines (floor {args.total:.0f} %)")
    low = {name: data["summary"]["percent_covered"] for name, data in report["files"].items()
           if data["summary"]["percent_covered"] < args.module}
    for name, percent in sorted(low.items()):
        print(f"coverage: {name}: {percent:.1f} % (floor {args.module:.0f} % for each module)")
    return 1 if total < args.total or low else 0


if __name__ == "__main__":
    sys.exit(main())
