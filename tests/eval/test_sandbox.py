"""Adversarial tests of esr.eval.sandbox: each runs one hostile (or one plain) program and checks one property.

Deliberate escape attempts (network, filesystem, signals, /proc, ctypes syscalls, IPC) are in test_sandbox_escapes.py.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from esr.eval import sandbox
from esr.eval.sandbox import SandboxResult, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

REPO = Path(__file__).resolve().parents[2]


def run(code: str, **kwargs: object) -> SandboxResult:
    """Run dedented ``code`` with a small default timeout."""
    kwargs.setdefault("timeout_s", 3.0)
    return run_program(textwrap.dedent(code), **kwargs)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def leftovers(workdir: str, within_s: float = 1.0) -> list[int]:
    """Live processes of the run that used ``workdir`` (its bootstrap's command line holds it, forks inherit it),
    allowing the kernel ``within_s`` to finish the kills; they are killed, then returned. Pids printed by the program
    would be those of its PID namespace, meaningless here."""
    def scan() -> list[int]:
        found = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                if workdir.encode() in Path(f"/proc/{name}/cmdline").read_bytes() and alive(int(name)):
                    found.append(int(name))
            except OSError:
                pass
        return found

    deadline = time.monotonic() + within_s
    while (found := scan()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in found:  # a failing test leaves nothing behind
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return found


@pytest.fixture(scope="module")
def protections() -> tuple[str, ...]:
    """What the sandbox could install on this machine (netns, uid, readonly_fs, ...)."""
    return run_program("pass", timeout_s=5).protections


def test_normal_program_passes_with_its_stdout() -> None:
    result = run("print('hello', sum(range(10)))")
    assert (result.status, result.passed, result.returncode) == ("ok", True, 0)
    assert (result.stdout, result.stderr, result.truncated) == ("hello 45\n", "", False)


def test_exception_is_an_error_with_the_programs_traceback() -> None:
    result = run("def f():\n    raise ValueError('boom')\nf()\n")
    assert (result.status, result.passed, result.returncode) == ("error", False, 1)
    assert 'program.py", line 2, in f' in result.stderr and "ValueError: boom" in result.stderr
    assert "sandbox.py" not in result.stderr


@pytest.mark.parametrize(("code", "returncode", "stdout", "stderr"), [
    ("import sys\nprint('a')\nsys.exit(3)\n", 3, "a\n", ""),
    ("import sys\nsys.exit('bye')\n", 1, "", "bye\n"),
    ("import sys\nsys.exit(2**40 + 7)\n", 7, "", ""),
    ("import atexit\natexit.register(print, 'at exit')\nprint('main')\n", 0, "main\nat exit\n", ""),
    ("import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\n",
     0, "thread\n", ""),
    ("import ctypes\nctypes.CDLL(None).printf(b'from C\\n')\n", 0, "from C\n", ""),
    ("import sys\nsys.stdout.write('z' * 5000)\nsys.stdout.close()\n", 0, "z" * 5000, ""),
], ids=["exit-code", "exit-message", "exit-code-wraps", "atexit", "threads-joined", "c-stdio", "closed-stdout"])
def test_the_program_exits_as_python_would(code: str, returncode: int, stdout: str, stderr: str) -> None:
    result = run(code, max_processes=2)
    assert (result.returncode, result.stdout, result.stderr) == (returncode, stdout, stderr)


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = run("while True:\n    pass\n", timeout_s=2.0)
    assert result.status == "timeout" and not result.passed
    assert 2.0 <= result.seconds < 4.0 and time.monotonic() - start < 4.5


@pytest.mark.parametrize("spawn", [
    "os.fork()", "os.system('true')", "os.execv('/bin/true', ['x'])", "os.posix_spawn('/bin/true', [], {})",
    "subprocess.Popen(['true'])", "subprocess.run([sys.executable, '-c', 'pass'])"])
def test_process_spawning_loops_are_refused(spawn: str) -> None:
    result = run(f"import os, subprocess, sys\nfor _ in range(1000):\n    {spawn}\nprint('spawned')\n")
    assert result.status == "error" and "PermissionError" in result.stderr and "spawned" not in result.stdout


def test_ctypes_fork_bomb_is_capped_by_the_kernel(protections: tuple[str, ...]) -> None:
    if os.geteuid() == 0 and "uid" not in protections:
        pytest.skip("running as root without the uid switch: RLIMIT_NPROC does not apply")
    result = run("""
        import ctypes, os, time
        libc = ctypes.CDLL(None)
        forked = 0
        for _ in range(300):
            pid = libc.fork()
            if pid == 0:
                time.sleep(60)
                libc._exit(0)
            forked += pid > 0
        print(os.getcwd(), forked, flush=True)
    """, max_processes=3)
    workdir, forked = result.stdout.split()
    assert result.passed and int(forked) <= 3
    assert leftovers(workdir) == []


def test_memory_bomb_hits_the_memory_limit() -> None:
    result = run("chunks = []\nfor _ in range(100):\n    chunks.append(b'x' * 10**8)\nprint('10 GB')\n", memory_mb=256)
    assert result.status == "memory" and "MemoryError" in result.stderr and "10 GB" not in result.stdout


@pytest.mark.parametrize("folder", ["/tmp", str(REPO)])
def test_writes_outside_the_working_directory_fail(folder: str) -> None:
    target = Path(folder) / f"esr_sandbox_escape_{secrets.token_hex(6)}"
    try:
        result = run(f"try:\n    open({str(target)!r}, 'w').write('x')\n    print('written')\n"
                     f"except OSError as exc:\n    print('refused', exc.errno)\n")
        assert result.passed and result.stdout.startswith("refused") and not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_the_working_directory_is_writable_and_capped() -> None:
    result = run("""
        import tempfile
        open('small.txt', 'w').write('data')
        tempfile.NamedTemporaryFile(delete=False).write(b'1')
        print(open('small.txt').read(), flush=True)
        open('big.bin', 'wb').write(b'x' * (200 << 20))
    """)
    assert result.stdout == "data\n" and result.status == "error" and "OSError" in result.stderr


def test_connecting_to_localhost_fails() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        result = run(f"""
            import socket
            for attempt in (lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1), socket.socket):
                try:
                    attempt()
                    print('connected')
                except OSError as exc:
                    print('refused', type(exc).__name__)
        """)
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.passed and result.stdout == "refused PermissionError\nrefused PermissionError\n"


def test_local_socketpairs_still_work_for_asyncio() -> None:
    result = run("import asyncio\nasync def main():\n    return 42\nprint(asyncio.run(main()))\n")
    assert result.passed and result.stdout == "42\n"


def test_network_namespace_has_only_loopback(protections: tuple[str, ...]) -> None:
    if "netns" not in protections:
        pytest.skip("no network namespace on this machine")
    result = run("print(sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]))")
    assert result.passed and result.stdout == "['lo']\n"


def test_the_parents_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"esr-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("ESR_TEST_SECRET", secret)
    result = run("""
        import os
        print(dict(os.environ))
        try:
            print(open(f'/proc/{os.getppid()}/environ', 'rb').read())
        except OSError as exc:
            print('refused', exc)
    """)
    assert result.passed and "PATH" in result.stdout
    assert secret not in result.stdout + result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch needs root")
def test_root_runs_programs_under_a_private_uid(protections: tuple[str, ...]) -> None:
    if sandbox._blocker(sys.base_prefix) and "tmpfs_workdir" not in protections:
        pytest.skip("the stdlib is not reachable for other uids and cannot be re-exposed without a mount namespace")
    result = run("import os\nprint(os.getuid(), os.geteuid(), os.getgroups())\n")
    uid, euid, groups = result.stdout.split(" ", 2)
    assert result.passed and "uid" in result.protections and int(uid) == int(euid) > 0 and groups == "[]\n"


def test_killing_the_parent_is_refused() -> None:
    result = run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert result.status == "error" and "PermissionError" in result.stderr


def test_killing_the_parent_through_ctypes_is_refused_by_the_kernel(protections: tuple[str, ...]) -> None:
    if "uid" not in protections:
        pytest.skip("without the uid switch a ctypes kill would reach this test process")
    result = run("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                 "print(libc.kill(os.getppid(), 9), ctypes.get_errno())\n")
    assert result.passed and result.stdout == "-1 1\n"  # EPERM


def test_huge_output_is_truncated_without_buffering_it() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run("import sys\nsys.stdout.write('x' * 100_000_000)\n", max_output_bytes=4096)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.passed and result.truncated and result.stdout == "x" * 4096 and growth_mb < 50


def test_endless_output_is_truncated_and_times_out() -> None:
    result = run("while True:\n    print('y' * 1000)\n", timeout_s=2.0, max_output_bytes=10_000)
    assert result.status == "timeout" and result.truncated and len(result.stdout) == 10_000


@pytest.mark.parametrize("tail", ["", "while True:\n    pass\n"])
def test_the_working_directory_is_removed(tail: str) -> None:
    result = run(f"import os\nprint(os.getcwd(), flush=True)\n{tail}", timeout_s=2.0)
    workdir = result.stdout.strip()
    assert result.status == ("timeout" if tail else "ok")
    assert workdir.startswith(("/tmp", os.path.realpath("/tmp"))) and not os.path.exists(workdir)


def test_grandchildren_are_gone_after_a_timeout() -> None:
    result = run("""
        import ctypes, os, time
        libc = ctypes.CDLL(None)
        print(os.getcwd(), flush=True)
        pid = libc.fork()  # ctypes bypasses the Python-level guard; the child leaves the process group
        if pid == 0:
            libc.setsid()
            time.sleep(60)
            libc._exit(0)
        print(pid if pid > 0 else 'refused', flush=True)
        time.sleep(60)
    """, timeout_s=2.0, max_processes=2)
    assert result.status == "timeout"
    assert leftovers(result.stdout.split()[0]) == []
