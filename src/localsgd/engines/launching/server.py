"""A launcher server: one process that imports the elastic launcher's modules once and forks
every launcher this process starts after it.

Each launcher (:mod:`localsgd.engines.launching.elastic`) started as a new interpreter
imports torch, torch's elastic agent, ``torch._dynamo`` and the worker (about 3.5 CPU-s on
one core) before it forks its workers from itself. A study of many runs, or a test session,
paid that for every launch. The first launch of a process starts this server instead
(``python -m localsgd.engines.launching.server``, in a session of its own), which imports
those modules; that launch and every later one is a fork of the server, made to start as
``python -m localsgd.engines.launching.elastic ARGS`` would have:

- the caller's standard input, output and error, its current directory and environment,
  the import path that environment gives (``PYTHONPATH`` first), ``sys.argv``;
- a session of its own, as ``start_new_session`` gives a started one;
- the signal handling a started interpreter has: what the caller ignores stays ignored,
  every other handler is the default (and Python's for SIGINT);
- the caller's tie (``--watch-fd``): the launcher exits when its caller does;
- for an emulated node, the node's network namespace, entered as ``ip netns exec`` would.

The caller holds a :class:`ServedProcess`, which answers as a ``subprocess.Popen`` of the
launcher would (``pid``, ``poll``, ``wait``, ``send_signal``, ``returncode``): the server
reports the launcher's exit status to it. The server is tied to the process that started it
(it leaves when that process's end of their channel closes, however it exits) and is used
by that process alone (a fork of it starts its own). It is single-threaded: nothing but
the imports runs in it before a fork.

``LOCALSGD_LAUNCHER_SERVER=0`` starts every launcher as a new interpreter, as before; so
does any launch on a platform without ``fork`` and descriptor passing, or whose
interpreter-level environment (:data:`INTERPRETER_ENV`) differs from the server's (a new
server is started for it).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from localsgd.util.lifetime import exit_process, flush_streams, process_alive

SERVER_MODULE = "localsgd.engines.launching.server"
LAUNCHER_MODULE = "localsgd.engines.launching.elastic"
SWITCH = "LOCALSGD_LAUNCHER_SERVER"
"""``0`` starts every launcher as a new interpreter instead of forking it from a server."""

PRELOAD = (
    "torch",
    "torch.distributed.run",
    "torch._dynamo",
    LAUNCHER_MODULE,
    "localsgd.worker",
)
"""What a launcher imports before it forks its workers (see :func:`elastic.fork_workers`)."""

INTERPRETER_ENV = (
    *("PYTHONHOME", "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONOPTIMIZE", "PYTHONSAFEPATH"),
    *("PYTHONNOUSERSITE", "PYTHONUSERBASE", "PYTHONUTF8", "PYTHONIOENCODING", "PYTHONMALLOC"),
    *("PYTHONDEVMODE", "LD_PRELOAD", "LD_LIBRARY_PATH", "LOGLEVEL", "TORCH_LOGS"),
)
"""Variables read when an interpreter or the preloaded modules start: a launch whose values
differ from the server's gets a server of its own. (``PYTHONPATH`` is applied per launch.)"""

RESET_SIGNALS = tuple(s for s in sorted(signal.valid_signals()) if s not in (signal.SIGKILL, signal.SIGSTOP))
"""Every signal whose handling a launcher gets back as a started interpreter has it."""
_PYTHON_IGNORES = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, n))
"""Signals every Python interpreter ignores from its start."""

_FIELD = 65536
_START_TIMEOUT = 300.0
"""Seconds a launch waits for the server's reply before starting its launcher itself (the
first launch waits for the server's imports)."""


def wanted(command: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether the launcher ``command`` (``sys.executable -m`` the elastic launcher) is
    forked from this process's server."""
    return (
        list(command[:3]) == [sys.executable, "-m", LAUNCHER_MODULE]
        and env.get(SWITCH, os.environ.get(SWITCH, "1")) != "0"
        and hasattr(os, "fork")
        and hasattr(socket, "send_fds")
        and sys.platform.startswith("linux")
    )


class ServedProcess:
    """A launcher forked by the server, held as a ``subprocess.Popen`` of it would be."""

    def __init__(self, args: list[str], pid: int, channel: socket.socket) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._channel = channel
        self._lock = threading.Lock()

    def _read(self, timeout: float | None) -> int | None:
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            ready, _, _ = select.select([self._channel], [], [], timeout)
            if not ready:
                return None
            try:
                data = self._channel.recv(_FIELD)
            except OSError:
                data = b""
            if data:
                self.returncode = int(json.loads(data)["code"])
            else:
                # The server went away first: the launcher is an orphan now, and its status
                # is lost. It is over when the process is (its tie still ends it with us).
                if process_alive(self.pid):
                    return None
                self.returncode = 1
            self._channel.close()
            return self.returncode

    def poll(self) -> int | None:
        return self._read(0)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            code = self._read(0.5 if left is None else min(left, 0.5))
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Launcher: TypeAlias = "subprocess.Popen[bytes] | ServedProcess"
"""A launcher this process holds: started (``Popen``) or forked by the server."""


class _Server:
    """This process's side of a running server."""

    def __init__(self, env: Mapping[str, str], cwd: str) -> None:
        self.owner = os.getpid()
        self.lock = threading.Lock()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.channel = mine

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.close()

    def fork(self, request: dict[str, Any], fds: Sequence[int]) -> ServedProcess | None:
        """Send one launch; its process, or None when the server cannot serve it."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.lock:
                socket.send_fds(self.channel, [json.dumps(request).encode()], [theirs.fileno(), *fds])
            theirs.close()
            ready, _, _ = select.select([mine], [], [], _START_TIMEOUT)
            data = mine.recv(_FIELD) if ready else b""
            reply = json.loads(data) if data else {}
        except (OSError, ValueError):
            reply = {}
        except BaseException:
            mine.close()  # interrupted: a launcher forked now finds no one and is killed
            raise
        finally:
            with contextlib.suppress(OSError):
                theirs.close()
        if "pid" not in reply:
            mine.close()
            return None
        return ServedProcess(list(request["argv"]), int(reply["pid"]), mine)


_servers: dict[tuple[str, ...], _Server] = {}
_servers_lock = threading.Lock()


def _key(env: Mapping[str, str]) -> tuple[str, ...]:
    return (sys.executable, *(f"{name}={env.get(name, '')}" for name in INTERPRETER_ENV))


def _ignored() -> list[int]:
    """The signals this process ignores, which a started child would inherit ignored."""
    found = []
    for sig in RESET_SIGNALS:
        if sig in _PYTHON_IGNORES:
            continue
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) == signal.SIG_IGN:
                found.append(int(sig))
    return found


def start(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: int,
    tie: int | None,
    netns: str | None = None,
) -> ServedProcess | None:
    """Fork the launcher ``command`` from this process's server (started now if there is
    none), with standard input from ``/dev/null``, standard output and error on ``stdout``
    (a descriptor), in the current directory, with ``env``, tied by descriptor ``tie``
    (what ``--watch-fd`` names in ``command``), and (``netns``: the path of a network
    namespace, as ``ip netns exec`` would enter it) in that network namespace. None when no
    server can serve it: the caller starts the launcher itself."""
    key = _key(env)
    cwd = os.getcwd()
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and (server.owner != os.getpid() or server.proc.poll() is not None):
            if server.owner == os.getpid():
                server.close()
            server = None
        if server is None:
            server = _servers[key] = _Server(env, cwd)
    request = {
        "argv": list(command[3:]),
        "env": dict(env),
        "cwd": cwd,
        "ignored": _ignored(),
        "tie": tie is not None,
        "netns": netns,
    }
    with open(os.devnull, "rb") as null:
        fds = [null.fileno(), stdout, stdout] + ([tie] if tie is not None else [])
        served = server.fork(request, fds)
    if served is None:
        with _servers_lock:
            if _servers.get(key) is server:
                del _servers[key]
        server.close()
    return served


# ---- the server process -------------------------------------------------------------------


def _serve(channel: socket.socket) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    base = _base_path()
    os.chdir("/")  # each launcher goes to its caller's; this one holds none
    served = _Served(channel, base)
    while True:
        ready, _, _ = select.select([channel], [], [], 0.05)
        if ready and not served.accept():
            return  # the process that started this one is gone: so is this one
        served.reap()


class _Served:
    """The server's launchers: forked on request, their exit statuses sent back."""

    def __init__(self, channel: socket.socket, base: list[str]) -> None:
        self.channel = channel
        self.base = base
        self.replies: dict[int, socket.socket] = {}

    def accept(self) -> bool:
        """Fork the launcher of one request; False when the caller has gone."""
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, _FIELD, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            return False
        reply_to = socket.socket(fileno=fds[0])
        try:
            request = json.loads(data)
        except ValueError:
            request = None
        if request is not None:
            flush_streams()
            pid = os.fork()
            if pid == 0:
                for sock in (self.channel, reply_to, *self.replies.values()):
                    sock.detach()  # closed below by number, never by a collected object
                _launcher(request, fds[1:], self.base)  # never returns
        for fd in fds[1:]:
            os.close(fd)
        if request is None:
            reply_to.close()
            return True
        try:
            reply_to.send(json.dumps({"pid": pid}).encode())
        except OSError:
            # The caller gave up waiting (or was interrupted) and starts no launcher from
            # here: this one must not run unseen.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # just forked: nothing of its own started yet
        self.replies[pid] = reply_to
        return True

    def reap(self) -> None:
        while self.replies:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            reply_to = self.replies.pop(pid, None)
            if reply_to is None:
                continue
            with contextlib.suppress(OSError):
                reply_to.send(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode())
            reply_to.close()


def _base_path() -> list[str]:
    """This interpreter's import path without what its directory and ``PYTHONPATH`` put
    there (a launch puts its own)."""
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    head = 1 + len(given)  # sys.path[0]: the directory ``-m`` was run in
    return sys.path[head:]


def _launcher(request: dict[str, Any], fds: list[int], base: list[str]) -> None:
    """The forked launcher: made to start as the started one would, then run."""
    code: int | str | None = 1
    try:
        argv = _as_started(request, fds, base)
        from localsgd.engines.launching import elastic

        sys.argv = [elastic.__file__, *argv]
        try:
            code = elastic.main(argv)
        except SystemExit as exc:
            code = exc.code
        except KeyboardInterrupt:
            flush_streams()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        exit_process(code)


def _as_started(request: dict[str, Any], fds: list[int], base: list[str]) -> list[str]:
    """Make this forked process what ``python -m LAUNCHER ARGS`` started by the caller would
    be at its start; returns ARGS (``--watch-fd`` naming the tie's descriptor here)."""
    os.setsid()
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    if request.get("netns"):
        _enter_network_namespace(request["netns"])
    tie = os.dup(fds[3]) if request.get("tie") and len(fds) > 3 else None
    if tie is None:
        os.closerange(3, _max_fd())
    else:
        os.closerange(3, tie)
        os.closerange(tie + 1, _max_fd())
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    given = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [request["cwd"], *given, *base]
    ignored = set(request.get("ignored", ()))
    for sig in RESET_SIGNALS:
        if sig in _PYTHON_IGNORES or sig in ignored:
            handler: Any = signal.SIG_IGN
        elif sig == signal.SIGINT:
            handler = signal.default_int_handler
        else:
            handler = signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, handler)
    argv = list(request["argv"])
    if tie is not None and "--watch-fd" in argv:
        argv[argv.index("--watch-fd") + 1] = str(tie)
    return argv


_CLONE_NEWNET = 0x40000000


def _enter_network_namespace(path: str) -> None:
    """Move this (single-threaded) process into the network namespace at ``path``."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 1024


def main() -> None:
    channel = socket.socket(fileno=int(sys.argv[1]))
    _serve(channel)


if __name__ == "__main__":
    main()
