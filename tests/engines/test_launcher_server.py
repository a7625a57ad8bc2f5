"""Launchers forked from a launcher server start as started ones would: the caller's
directory, environment, output file and ignored signals, a session of their own, their exit
status reported as a ``Popen``'s, tied to the caller; the server stays single-threaded and
leaves with the process that started it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from localsgd.engines.launching import server
from localsgd.engines.launching.launch import Launched, torchrun_command, worker_env
from localsgd.util.lifetime import process_alive

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks and passes descriptors (Linux)"),
]

PROBE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    handling = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        h = signal.getsignal(sig)
        handling[sig.name] = "ignored" if h == signal.SIG_IGN else "default" if h == signal.SIG_DFL else "python"
    out = {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "marker": os.environ.get("LAUNCHER_SERVER_TEST"),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "parent": os.getppid(),
        "session": os.getsid(0),
        "handling": handling,
        "launcher_pid": os.environ.get("LOCALSGD_LAUNCHER_PID"),
    }
    print("probe says " + json.dumps(out), flush=True)
    if len(sys.argv) > 1 and sys.argv[1] == "sleep":
        time.sleep(120)
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0)
    """
)


def _launch(folder: Path, *args: str, ignore: tuple[int, ...] = ()) -> tuple[Launched, Path]:
    folder.mkdir(exist_ok=True)
    probe = folder / "probe.py"
    probe.write_text(PROBE)
    log = folder / "launcher.log"
    env = worker_env(1, {"LAUNCHER_SERVER_TEST": "given"})
    before = {sig: signal.getsignal(sig) for sig in ignore}
    for sig in ignore:
        signal.signal(sig, signal.SIG_IGN)
    try:
        launched = Launched(lambda fd: torchrun_command(1, [str(probe), *args], watch_fd=fd), env, log)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return launched, log


def _said(log: Path) -> dict:
    [line] = [line for line in log.read_text().splitlines() if "probe says " in line]
    return json.loads(line.split("probe says ", 1)[1])


def test_a_served_launcher_starts_as_a_started_one_would(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launched, log = _launch(tmp_path, ignore=(signal.SIGUSR1,))
    assert isinstance(launched.proc, server.ServedProcess)
    assert launched.proc.wait(120) == 0, log.read_text()
    said = _said(log)
    agent = launched.proc.pid
    assert said["cwd"] == str(tmp_path)
    assert said["marker"] == "given" and said["threads"] == "1"
    # The worker's parent is the launcher, in the launcher's own session.
    assert said["parent"] == agent and said["launcher_pid"] == str(agent)
    # What this process ignored stays ignored (torch's agent handles SIGINT, SIGTERM and
    # SIGHUP itself, so its started workers get them back as a fresh interpreter has them).
    assert said["handling"] == {"SIGINT": "python", "SIGTERM": "default", "SIGHUP": "default", "SIGUSR1": "ignored"}

    # A second launch is served by the same server, and equals a launcher started anew.
    again, log2 = _launch(tmp_path / "again")
    assert again.proc.wait(120) == 0
    monkeypatch.setenv(server.SWITCH, "0")
    started, log3 = _launch(tmp_path / "started")
    assert isinstance(started.proc, subprocess.Popen)
    assert started.proc.wait(120) == 0
    pids = ("pid", "parent", "session", "launcher_pid")
    served, fresh = ({k: v for k, v in _said(log).items() if k not in pids} for log in (log2, log3))
    assert served == fresh and served["cwd"] == str(tmp_path)


def test_exit_statuses_are_the_launchers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failed, log = _launch(tmp_path, "3")
    assert failed.proc.wait(120) == 1  # torch's agent: a worker failed
    assert "exitcode: 3" in log.read_text()

    bad = tmp_path / "bad.log"
    bad_launch = Launched(
        lambda fd: [sys.executable, "-m", server.LAUNCHER_MODULE, "--exit-barrier", "soon"], worker_env(1), bad
    )
    assert bad_launch.proc.wait(60) == 2
    assert "error: --exit-barrier takes seconds > 0, got 'soon'" in bad.read_text()

    slow, _ = _launch(tmp_path, "sleep")
    deadline = time.monotonic() + 60
    while slow.proc.poll() is None and "probe says" not in (tmp_path / "launcher.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(subprocess.TimeoutExpired):
        slow.proc.wait(0.2)
    # A session of its own, as start_new_session gives.
    assert os.getsid(slow.proc.pid) == slow.proc.pid != os.getsid(0)
    slow.proc.send_signal(signal.SIGKILL)
    assert slow.proc.wait(30) == -signal.SIGKILL
    slow.stop()  # its workers: killed with its process group


CALLER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from localsgd.engines.launching.launch import Launched, torchrun_command, worker_env
    from localsgd.engines.launching import server
    probe = Path(sys.argv[1])
    launched = Launched(lambda fd: torchrun_command(1, [str(probe), "sleep"], watch_fd=fd),
                        worker_env(1), probe.parent / "caller.log")
    log = probe.parent / "caller.log"
    while "probe says" not in log.read_text():
        time.sleep(0.1)
    [srv] = server._servers.values()
    threads = len(list(Path(f"/proc/{srv.proc.pid}/task").iterdir()))
    print(json.dumps({"server": srv.proc.pid, "launcher": launched.proc.pid, "threads": threads}), flush=True)
    time.sleep(120)
    """
)


def test_the_server_is_single_threaded_and_leaves_with_its_caller_and_so_do_its_launchers(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, str(probe)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        line = caller.stdout.readline()
        pids = json.loads(line)
        # Nothing but the imports runs in the server: a fork copies one thread.
        assert pids["threads"] == 1
        assert process_alive(pids["server"]) and process_alive(pids["launcher"])
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 30
        while alive := [name for name in ("server", "launcher") if process_alive(pids[name])]:
            assert time.monotonic() < deadline, f"{alive} outlived the caller"
            time.sleep(0.1)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()


def test_a_launcher_whose_caller_gave_up_waiting_is_killed_and_the_next_is_served(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = worker_env(1)
    srv = server._Server(env, str(tmp_path))
    try:

        def request() -> dict:
            command = torchrun_command(1, [str(probe)])
            return {"argv": command[3:], "env": env, "cwd": str(tmp_path), "ignored": [], "tie": False}

        abandoned, served = tmp_path / "abandoned.log", tmp_path / "served.log"
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with abandoned.open("wb") as out, open(os.devnull, "rb") as null:
            message = [json.dumps(request()).encode()]
            socket.send_fds(srv.channel, message, [theirs.fileno(), null.fileno(), out.fileno(), out.fileno()])
        theirs.close()
        mine.close()  # gone before the server's reply: its launcher must not run unseen
        # The server takes requests in order: by the time the next launch has run, the
        # abandoned one was forked, found no one to tell, and was killed.
        with served.open("wb") as out, open(os.devnull, "rb") as null:
            launched = srv.fork(request(), [null.fileno(), out.fileno(), out.fileno()])
        assert launched is not None and launched.wait(120) == 0
        assert "probe says" in served.read_text()
        time.sleep(1.0)
        assert "probe says" not in abandoned.read_text()
    finally:
        srv.close()
