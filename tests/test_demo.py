"""The README's main-job command, as a smoke test (a smaller image)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.cluster


def test_the_demo_replicates_verifies_and_deletes_on_a_real_cluster():
    result = subprocess.run([sys.executable, "-m", "tools.demo"], cwd=ROOT, text=True,
                            capture_output=True, timeout=300,
                            env={**os.environ, "DEMO_IMAGE_MIB": "16"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in ["node2: verified copy in place", "node3: verified copy in place",
                 "every node holds a byte-identical copy",
                 "glance-image-sync status",
                 "gone from every node", "[demo] done"]:
        assert line in out, line
    assert out.count("bytes  md5 ") == 3  # the image, shown on each of the three nodes
