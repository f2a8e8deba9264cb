"""The rule "never a shell" is enforced, not only written down.

Ruff, with this repository's own ``pyproject.toml``, must reject every way of
starting a program through a shell, in the package, the tools and the tests (a
snippet is checked as if it were a file there, so a per-file exemption would
show), while it accepts the way the package does start rsync. The
package, the tools and the tests pass that configuration with no ``noqa``
hiding a shell. And every call that starts a program in the package is known
here and has an argument list, a minimal environment and a timeout.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "glance_image_sync"
SHELL_RULES = {"S602", "S604", "S605", "TID251"}


def ruff(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
                           str(ROOT / "pyproject.toml"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def findings(source: str, where="glance_image_sync/_lint_probe.py") -> set:
    """Rule codes ruff reports for ``source`` as if it were the file ``where``."""
    result = ruff("--output-format", "json", "--stdin-filename", where, "-", stdin=source)
    assert result.returncode in (0, 1), result.stderr
    return {finding["code"] for finding in json.loads(result.stdout)}


SHELLS = [
    pytest.param('subprocess.run("rsync " + image_id, shell=True)', {"S602"}, id="run-shell"),
    pytest.param('subprocess.Popen(["rsync", image_id], shell=True)', {"S602"},
                 id="Popen-list-shell"),
    pytest.param("subprocess.check_output(command, shell=1)", {"S602"}, id="truthy-shell"),
    pytest.param("subprocess.call(command, shell=True)", {"S602"}, id="call-shell"),
    pytest.param("run_command(command, shell=True)", {"S604"}, id="any-call-shell"),
    pytest.param('os.system("rm " + image_id)', {"S605", "TID251"}, id="os.system"),
    pytest.param('os.popen("rm " + image_id)', {"S605", "TID251"}, id="os.popen"),
    pytest.param("from os import system\n\nsystem(command)", {"TID251"}, id="from-os-system"),
    pytest.param("from os import popen\n\npopen(command)", {"TID251"}, id="from-os-popen"),
    pytest.param("import os as o\n\no.system(command)", {"TID251"}, id="aliased-os.system"),
    pytest.param("subprocess.getoutput(command)", {"S605"}, id="getoutput"),
    pytest.param("subprocess.getstatusoutput(command)", {"S605"}, id="getstatusoutput"),
    pytest.param("asyncio.create_subprocess_shell(command)", {"TID251"}, id="asyncio-shell"),
]


def _module(source: str) -> str:
    """A whole module around ``source``: its imports, then the names it uses."""
    if source.startswith(("from ", "import ")):
        imports, _, body = source.partition("\n\n")
    else:
        imports, body = "import asyncio\nimport os\nimport subprocess", source
    return f"{imports}\n\ncommand = image_id = ''\n{body}\n"


@pytest.mark.parametrize("source, expected", SHELLS)
@pytest.mark.parametrize("where", ["glance_image_sync", "tools", "tests"])
def test_the_lint_configuration_rejects_every_shell(source, expected, where):
    found = findings(_module(source), f"{where}/_lint_probe.py")
    assert expected <= found, f"ruff reported {sorted(found)}"


def test_the_way_the_package_starts_rsync_passes():
    source = ('import subprocess\n\nargv = ["rsync", "--", "src", "dest"]\n'
              'proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin"},\n'
              '                        close_fds=True)\nproc.communicate(timeout=10)\n'
              'subprocess.run(argv, env={}, timeout=10, check=True)\n')
    assert findings(source) == set()


def test_the_repository_passes_its_lint_rules_with_no_shell_hidden_by_noqa():
    everything = ruff(".")
    assert everything.returncode == 0, everything.stdout + everything.stderr
    shells = ruff("--ignore-noqa", "--select", ",".join(sorted(SHELL_RULES)), ".")
    assert shells.returncode == 0, shells.stdout + shells.stderr


# -- every program the package starts ---------------------------------------------------

STARTERS = {
    "subprocess": {"Popen", "run", "call", "check_call", "check_output", "getoutput",
                   "getstatusoutput"},
    "os": {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv",
           "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
           "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"},
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
    "pty": {"spawn", "fork"},
}
# Where the package starts a program, as (module, function, call). A new one must be
# reviewed for the rules below and added here.
KNOWN = {
    # rsync for the transfers and listings, and doctor's ssh to a peer.
    ("transfer/rsync.py", "run_rsync", "subprocess.Popen"),
    # systemctl show: doctor reads the unit's sandbox (ReadWritePaths).
    ("admin/doctor_local.py", "systemctl_show", "subprocess.run"),
    # ssh -G: how ssh names a peer in known_hosts (ssh-keys; it connects nowhere).
    ("admin/sshkeys.py", "known_host_name", "subprocess.run"),
    # `ssh -O check|stop` on a ControlMaster's socket, so that no ssh connection to a
    # peer outlives the process that opened it, and doctor retires one before it checks
    # a peer (transfer/masters.py).
    ("transfer/masters.py", "_control", "subprocess.run"),
    # serve: a peer's request that is not a stream becomes rrsync -ro, in this process
    # (stdin and stdout are that peer's rsync; it ends when the peer's does).
    ("transfer/serve.py", "main", "os.execvpe"),
}


def _calls_that_start_programs():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)
                        and node.func.attr in STARTERS.get(node.func.value.id, ())):
                    found.append((path.relative_to(PACKAGE).as_posix(), function.name, node,
                                  function))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in STARTERS:
                names = {alias.name for alias in node.names} & STARTERS[node.module]
                assert not names, f"{path} imports {names} from {node.module}"
    return found


def test_every_program_the_package_starts_is_known():
    calls = _calls_that_start_programs()
    assert {(module, function, ast.unparse(call.func)) for module, function, call, _ in calls} \
        == KNOWN


@pytest.mark.parametrize("module, function, call, body", _calls_that_start_programs())
def test_every_program_gets_an_argument_list_a_minimal_environment_and_a_timeout(
        module, function, call, body):
    where = f"{module}:{call.lineno}"
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    if ast.unparse(call.func) == "os.execvpe":  # becomes the program: argv and env only
        file, argv, env = call.args
        assert isinstance(argv, (ast.Name, ast.List)), where
        assert "subprocess_env()" in ast.unparse(env), f"{where}: env must be the minimal one"
        return
    assert "shell" not in keywords and None not in keywords, f"{where}: no shell, no **kwargs"
    argv = call.args[0] if call.args else keywords.get("args")
    assert isinstance(argv, (ast.Name, ast.List)), f"{where}: argv must be a list, not a string"
    assert ast.unparse(keywords.get("env", ast.Constant(None))) == "subprocess_env()", \
        f"{where}: env must be the minimal one"
    assert ast.unparse(keywords.get("stdin", ast.Constant(None))) == "subprocess.DEVNULL", where
    if ast.unparse(call.func) == "subprocess.Popen":
        waits = [node for node in ast.walk(body) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and node.func.attr == "communicate"
                 and any(keyword.arg == "timeout" for keyword in node.keywords)]
        assert waits, f"{where}: a Popen must be waited for with a timeout"
    else:
        assert "timeout" in keywords, f"{where}: needs a timeout"
