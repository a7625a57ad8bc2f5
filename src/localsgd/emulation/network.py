"""Emulated nodes on one machine: Linux network namespaces joined by a bridge, with links
shaped by a token bucket (``tc ... tbf``).

::

    node0 ns [veth n0]──┐                       every node: its own network namespace, one
    node1 ns [veth n1]──┼── bridge (switch ns)  address 10.77.0.(i+1)/24, loopback up; the
    ...                 ┘                       switch: a namespace holding the bridge

Each node's link is full duplex: a ``tbf`` on both ends of its veth pair caps what the node
sends (node side) and what it receives (switch side) at ``rate``. Processes of one node talk
over the node's loopback (unshaped), nodes over their shaped links. Nothing is created in
the machine's own namespace: every name starts with a random ``lsgd<6 hex>`` identity, the
addresses exist only inside the new namespaces, and deleting the namespaces removes every
link with them. Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsgd.util.lifetime import process_alive

log = logging.getLogger(__name__)

PREFIX = "lsgd"
"""Every namespace and interface this module creates starts with it."""
SUBNET = "10.77.0"
"""Node i has address ``SUBNET.(i+1)``; it exists only inside the emulation's namespaces."""
STATE_DIR = Path("/run/localsgd-emulation")
"""One file per live emulation (its namespaces and owner pid), for :func:`cleanup_stale`."""
MAX_NODES = 250
NETNS_DIR = "/run/netns"
"""Where ``ip netns add`` keeps a named namespace's file."""

_IDENT = re.compile(rf"{PREFIX}[0-9a-f]{{6}}")
_NAMESPACE = re.compile(rf"({_IDENT.pattern})-(node\d+|switch)")
_RATE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)", re.IGNORECASE)
_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
    "tbps": 8e12,
}


class EmulationError(RuntimeError):
    """Setting up or tearing down the emulated network failed (the command and its output)."""


def parse_rate(text: str, name: str = "rate") -> float:
    """Bits per second of a ``tc`` rate (``100mbit``, ``1gbit``, ``12.5mbps`` = bytes/s ×
    8); ``ValueError`` naming ``name`` otherwise."""
    match = _RATE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"{name} must be a positive tc rate such as '100mbit' or '1gbit' "
            f"(units: {', '.join(_RATE_UNITS)}), got {text!r}"
        )
    return float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]


MIN_BURST = 2 * 1514
"""Two full Ethernet frames: the smallest bucket the defaults use."""


def default_burst(rate_bits: float) -> int:
    """Bytes the bucket holds: 2 ms at the rate (at least two frames). Smaller buckets
    lose throughput whenever the qdisc's timer fires late on a busy machine (a 1 Gbit/s
    link with a 16 KiB bucket carried ~520 Mbit/s here, with 256 KiB ~950); larger ones let
    more of each message through at memory speed."""
    return max(int(rate_bits / 8 * 2e-3), MIN_BURST)


@dataclass(frozen=True)
class NetworkSpec:
    """What to emulate: ``nodes`` namespaces; each node's link shaped to ``rate`` (a ``tc``
    rate; None: unshaped, as fast as the kernel forwards) with a bucket of ``burst`` bytes."""

    nodes: int
    rate: str | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.nodes, bool)
            or not isinstance(self.nodes, int)
            or not 1 <= self.nodes <= MAX_NODES
        ):
            raise ValueError(f"nodes must be an integer in [1, {MAX_NODES}], got {self.nodes!r}")
        if self.rate is not None:
            parse_rate(self.rate)
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1500
        ):
            raise ValueError(
                f"burst must be an integer number of bytes >= 1500 (one frame), got {self.burst!r}"
            )

    @property
    def rate_bits(self) -> float | None:
        """The link rate in bits per second, None when unshaped."""
        return None if self.rate is None else parse_rate(self.rate)

    def describe(self) -> str:
        if self.rate is None:
            return f"{self.nodes} emulated nodes, unshaped links"
        return f"{self.nodes} emulated nodes, links shaped to {self.rate} (tbf, burst {self.bucket()} B)"

    def bucket(self) -> int:
        rate = self.rate_bits
        assert rate is not None, "an unshaped link has no bucket"
        return self.burst if self.burst is not None else default_burst(rate)


def unavailable() -> str | None:
    """Why namespaces cannot be emulated here (None when they can): not root, or no
    ``ip``/``tc``."""
    if os.geteuid() != 0:
        return "emulating nodes needs root (network namespaces, veth pairs, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"emulating nodes needs iproute2: {', '.join(missing)} not found on PATH"
    return None


def _run(command: Sequence[str], timeout: float = 30.0) -> str:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulationError(f"{' '.join(command)}: {exc}") from None
    if done.returncode != 0:
        raise EmulationError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    """The machine's network namespaces, by name."""
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    """Processes running inside ``namespace``."""
    try:
        out = _run(["ip", "netns", "pids", namespace])
    except EmulationError:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


class EmulatedNetwork:
    """The namespaces, bridge and shaped links of one emulation (module docstring).

    ``up()`` builds it; ``down()`` (idempotent; also on ``__exit__`` and after a failed
    ``up``) kills every process left inside its namespaces and deletes them, which removes
    their links. It deletes only namespaces it created itself, whose names carry its own
    identity: anything else is refused.
    """

    def __init__(self, spec: NetworkSpec, *, ident: str | None = None) -> None:
        self.spec = spec
        self.ident = ident if ident is not None else f"{PREFIX}{secrets.token_hex(3)}"
        if not _IDENT.fullmatch(self.ident):
            raise ValueError(f"ident must look like {PREFIX} + 6 hex digits, got {self.ident!r}")
        self.nodes = [f"{self.ident}-node{i}" for i in range(spec.nodes)]
        self.switch = f"{self.ident}-switch"
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(spec.nodes)]
        # Interface names stay within Linux's 15 characters: lsgdXXXXXX + n/s + node index.
        self.interfaces = [f"{self.ident}n{i}" for i in range(spec.nodes)]
        self._switch_ports = [f"{self.ident}s{i}" for i in range(spec.nodes)]
        self._bridge = f"{self.ident}br"
        self._created: list[str] = []

    # -- building ---------------------------------------------------------------------------

    def up(self) -> EmulatedNetwork:
        if self._created:
            raise RuntimeError(f"emulated network {self.ident} is already up")
        try:
            self._write_state()
            self._add_namespace(self.switch)
            sw = ["ip", "-n", self.switch]
            _run([*sw, "link", "add", self._bridge, "type", "bridge"])
            _run([*sw, "link", "set", self._bridge, "up"])
            for i, node in enumerate(self.nodes):
                self._add_namespace(node)
                inside = ["ip", "-n", node]
                _run([*inside, "link", "set", "lo", "up"])
                veth = ["ip", "link", "add", self.interfaces[i], "netns", node, "type", "veth"]
                _run([*veth, "peer", "name", self._switch_ports[i], "netns", self.switch])
                _run([*sw, "link", "set", self._switch_ports[i], "master", self._bridge])
                _run([*sw, "link", "set", self._switch_ports[i], "up"])
                _run([*inside, "addr", "add", f"{self.addresses[i]}/24", "dev", self.interfaces[i]])
                _run([*inside, "link", "set", self.interfaces[i], "up"])
                if self.spec.rate is not None:
                    # Both directions of the node's link: what it sends, and what it receives.
                    self._shape(node, self.interfaces[i])
                    self._shape(self.switch, self._switch_ports[i])
        except BaseException:
            self.down()
            raise
        log.info("emulated network %s up: %s", self.ident, self.spec.describe())
        return self

    def _add_namespace(self, name: str) -> None:
        if name in namespaces():
            raise EmulationError(f"network namespace {name!r} exists already; refusing to reuse it")
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        self._write_state()

    def _shape(self, namespace: str, device: str) -> None:
        assert self.spec.rate is not None
        tbf = ["rate", self.spec.rate, "burst", str(self.spec.bucket()), "latency", "50ms"]
        _run(["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", *tbf])

    # -- tearing down ---------------------------------------------------------------------------

    def owns(self, namespace: str) -> bool:
        """Whether ``namespace`` was created by this emulation (and carries its identity)."""
        match = _NAMESPACE.fullmatch(namespace)
        return namespace in self._created and match is not None and match.group(1) == self.ident

    def pids(self) -> list[int]:
        """Processes running inside this emulation's namespaces."""
        return [pid for ns in self._created for pid in namespace_pids(ns)]

    def down(self) -> None:
        """Kill what runs inside the namespaces, then delete them (switch last)."""
        kill_all(self.pids())
        for name in sorted(self._created, key=lambda n: n == self.switch):
            self.delete_namespace(name)
        self._remove_state()

    def delete_namespace(self, name: str) -> None:
        """Delete ``name``, which must be one of this emulation's own namespaces."""
        if not self.owns(name):
            raise EmulationError(
                f"refusing to delete network namespace {name!r}: emulation {self.ident} did not create it"
            )
        try:
            _run(["ip", "netns", "del", name])
        except EmulationError as exc:
            if name in namespaces():
                raise
            log.debug("namespace %s was gone already: %s", name, exc)
        self._created.remove(name)
        self._write_state()

    # -- bookkeeping for cleanup after a hard kill --------------------------------------------

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.ident}.json"

    def _write_state(self) -> None:
        with contextlib.suppress(OSError):
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "namespaces": self._created}))
            os.replace(tmp, self.state_file)

    def _remove_state(self) -> None:
        with contextlib.suppress(OSError):
            self.state_file.unlink()

    def __enter__(self) -> EmulatedNetwork:
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def exec_prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program inside node ``node``."""
        return ["ip", "netns", "exec", self.nodes[node]]

    def namespace_path(self, node: int) -> str:
        """The file of node ``node``'s network namespace (what ``ip netns exec`` enters)."""
        return os.path.join(NETNS_DIR, self.nodes[node])


def kill_all(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace`` seconds."""
    alive = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.05)
        if not alive:
            return


def _alive(pid: int) -> bool:
    # A child we started stays a zombie until reaped: reap it, or it looks alive.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return process_alive(pid)
    return True


def cleanup_stale() -> list[str]:
    """Delete the namespaces of emulations whose owning process is gone (killed with
    SIGKILL, say), as recorded in :data:`STATE_DIR`; returns the names deleted. Live
    emulations and namespaces of anything else are left alone."""
    removed: list[str] = []
    if not STATE_DIR.is_dir():
        return removed
    existing = set(namespaces())
    for path in sorted(STATE_DIR.glob(f"{PREFIX}*.json")):
        ident = path.stem
        try:
            state = json.loads(path.read_text())
            pid = int(state["pid"])
            names = [str(n) for n in state["namespaces"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _IDENT.fullmatch(ident) or _alive(pid):
            continue
        network = EmulatedNetwork(NetworkSpec(1), ident=ident)
        network._created = [
            n for n in names if n in existing and (m := _NAMESPACE.fullmatch(n)) and m.group(1) == ident
        ]
        removed += network._created
        network.down()
        with contextlib.suppress(OSError):
            path.unlink()
    return removed


TEARDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP are ignored (a second Ctrl-C must not cut
    a teardown short); only in the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in TEARDOWN_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``SystemExit`` and SIGINT raises
    ``KeyboardInterrupt`` (also where it was inherited ignored, as in a job put in the
    background by a shell without job control), so ``finally`` clauses tear
    the emulation down. Only in the main thread; elsewhere the block runs unchanged."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
