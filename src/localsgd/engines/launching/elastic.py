"""torch's elastic launcher (torchrun), listening on one address and tied to its parent.

::

    python -m localsgd.engines.launching.elastic [--bind ADDR] [--watch-fd FD] [--exit-barrier S] TORCHRUN_ARGS...

torchrun's TCP stores (the rendezvous store, and the store its workers share) listen on
every interface of the machine, unauthenticated, whatever address they are given. This
launcher runs torchrun in its own process with every store server created on a socket
bound to ``ADDR`` alone (default ``127.0.0.1``: a single-node run is reachable from this
machine only). A multi-node run passes the address of the interface its nodes share, e.g.
``--bind 10.0.0.5 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint 10.0.0.5:29400``; the
workers' gloo sockets follow ``GLOO_SOCKET_IFNAME`` (see docs/reliability.md).

``--watch-fd FD`` ties the launcher to the process that started it
(:class:`~localsgd.util.lifetime.ParentTie`): when that process exits, however it exits,
the launcher exits at once, and its workers die with it (each arms a parent-death signal
in the worker entry point). ``LOCALSGD_LAUNCHER_PID`` tells the workers this process's pid.

``--exit-barrier S`` bounds how long a node whose workers have finished waits at torch's exit
barrier for the other nodes' agents (torch's default: 300 s). An agent that has failed never
arrives there: a node that outlived a lost node (an asynchronous run goes on without one)
waits that long before it exits.

Workers that run a module of this package with a ``forked_entry`` function
(``-m localsgd.worker``, what every launch of this package runs) are forked from this
process once it has imported torch and that module, instead of each starting an interpreter
and importing them again (:func:`fork_workers`); any other program is started as torchrun
starts it.

Every group of workers it starts learns the rendezvous round it belongs to
(:data:`RDZV_ROUND`). torch's own attempt counter (``TORCHELASTIC_RESTART_COUNT``) counts the
restarts of one agent: when one node's workers fail, that node's agent counts a restart and
the healthy nodes' agents, which only follow it into the next round, do not; the round is
the same number on every node.
"""

from __future__ import annotations

import datetime
import importlib
import io
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from localsgd.util.lifetime import EXIT_ORPHANED, LAUNCHER_PID, RDZV_ROUND, watch_parent

LOOPBACK = "127.0.0.1"


def bind_stores(address: str) -> None:
    """Make every TCP store server this process creates listen on ``address`` only.

    torch's store server binds all interfaces unless it is handed a listening socket
    (``master_listen_fd``); the launcher's code creates its stores through
    ``torch.distributed.TCPStore`` and the names it imported, which are replaced here by a
    subclass that binds the socket first."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous

    original = dist.TCPStore
    if getattr(original, "bound_to", None) is not None:
        return

    class BoundTCPStore(original):  # type: ignore[misc, valid-type]
        bound_to = address

        def __init__(
            self,
            host_name: str,
            port: int,
            world_size: int | None = None,
            is_master: bool = False,
            timeout: datetime.timedelta = datetime.timedelta(seconds=300),
            wait_for_workers: bool = True,
            multi_tenant: bool = False,
            master_listen_fd: int | None = None,
            use_libuv: bool = True,
        ) -> None:
            if is_master and master_listen_fd is None:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                listener = socket.create_server((address, port), family=family)
                port = listener.getsockname()[1]
                master_listen_fd = listener.detach()  # the store owns it now
            super().__init__(
                host_name,
                port,
                world_size,
                is_master,
                timeout,
                wait_for_workers,
                multi_tenant,
                master_listen_fd,
                use_libuv,
            )

    dist.TCPStore = BoundTCPStore  # type: ignore[misc, assignment]
    c10d_rendezvous_backend.TCPStore = BoundTCPStore  # type: ignore[misc, assignment]
    static_tcp_rendezvous.TCPStore = BoundTCPStore  # type: ignore[misc, assignment]


ROUND_LINE = "localsgd: rendezvous round {round}: this node is group rank {rank} of {nodes}"
"""What the launcher prints to stderr after each rendezvous (a node's log then says which
ranks its workers had: group rank g of a node with M workers runs ranks g·M to g·M + M − 1)."""


def export_round() -> None:
    """After every rendezvous of this agent, put its round into this process's environment,
    which the workers it then starts inherit, and print :data:`ROUND_LINE`."""
    from torch.distributed.elastic.rendezvous.api import RendezvousInfo
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    original = DynamicRendezvousHandler.next_rendezvous
    if getattr(original, "exports_round", False):
        return

    def next_rendezvous(self: DynamicRendezvousHandler) -> RendezvousInfo:
        info = original(self)
        round_ = self._state_holder.state.round
        os.environ[RDZV_ROUND] = str(round_)
        print(
            ROUND_LINE.format(round=round_, rank=info.rank, nodes=info.world_size),
            file=sys.stderr,
            flush=True,
        )
        return info

    next_rendezvous.exports_round = True  # type: ignore[attr-defined]
    DynamicRendezvousHandler.next_rendezvous = next_rendezvous  # type: ignore[method-assign]


def bound_exit_barrier(seconds: float) -> None:
    """Make the agents this process creates wait ``seconds`` at torch's exit barrier."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    original = SimpleElasticAgent.__init__

    def __init__(
        self: SimpleElasticAgent,
        spec: object,
        exit_barrier_timeout: float = 300,
        *args: object,
        **kwargs: object,
    ) -> None:
        original(self, spec, seconds, *args, **kwargs)  # type: ignore[arg-type]

    SimpleElasticAgent.__init__ = __init__  # type: ignore[method-assign]


RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""The signals torch's agent handles itself once it starts workers; a forked worker gets
back the handling this process started with, the one a started worker would inherit."""

_at_start: dict[int, Any] = {}


def fork_workers() -> None:
    """Have torchrun fork the workers of ``-m localsgd.X ARGS``, where module ``localsgd.X``
    has a ``forked_entry(*args)`` function, from this process (torch's ``fork`` start method
    for a function entry point), once the module and the modules it names in
    ``FORK_PRELOAD`` (what its workers would import later anyway) are imported here.

    A forked worker starts as a started one would: the environment of the moment its group
    starts (the rendezvous round included) plus torch's variables for its rank, the signal
    handling this process started with, unbuffered output (``python -u``), and the thread
    count ``OMP_NUM_THREADS`` asks for. Any other program is started as torchrun starts it,
    and so is every worker once this process has initialised CUDA (which a fork cannot
    carry)."""
    import torch.distributed.run as torchrun

    original = torchrun.config_from_args
    if getattr(original, "forks_workers", False):
        return
    _at_start.update({sig: signal.getsignal(sig) for sig in RESET_SIGNALS})

    def config_from_args(args: Any) -> tuple[Any, Any, list[str]]:
        config, cmd, cmd_args = original(args)
        if cmd == sys.executable and cmd_args[:2] == ["-u", "-m"] and _forkable(cmd_args[2:3]):
            config.start_method = "fork"
            return config, forked_worker, cmd_args[2:]
        return config, cmd, cmd_args

    config_from_args.forks_workers = True  # type: ignore[attr-defined]
    torchrun.config_from_args = config_from_args


def _forkable(module: list[str]) -> bool:
    """Whether ``module`` (its name, or nothing) is a module of this package with a
    ``forked_entry``, imported here with its ``FORK_PRELOAD``, and CUDA is untouched. A
    module that cannot be imported is started: its workers report it as ``python -m`` would."""
    if not module or not module[0].startswith("localsgd."):
        return False
    try:
        program = importlib.import_module(module[0])
    except ImportError:
        return False
    if not callable(getattr(program, "forked_entry", None)):
        return False
    for name in getattr(program, "FORK_PRELOAD", ()):
        importlib.import_module(name)
    import torch

    return not torch.cuda.is_initialized()


def forked_worker(module: str, *args: str) -> None:
    """A worker forked by torch's agent from this process (:func:`fork_workers`): made to
    start as ``python -u -m MODULE ARGS`` would, then ``MODULE.forked_entry(*ARGS)``."""
    for sig, handler in _at_start.items():
        if handler is not None:
            signal.signal(sig, handler)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        with_fd = getattr(stream, "fileno", None)
        if with_fd is None:
            continue
        try:
            raw = io.FileIO(with_fd(), "w", closefd=False)
        except (OSError, ValueError):
            continue
        unbuffered = io.TextIOWrapper(raw, encoding=stream.encoding, errors=stream.errors, write_through=True)
        setattr(sys, name, unbuffered)
        setattr(sys, f"__{name}__", unbuffered)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    entry: Callable[..., None] = importlib.import_module(module).forked_entry
    entry(*args)


class UsageError(ValueError):
    """A bad option of this launcher (its own, before torchrun's)."""


def own_options(args: list[str]) -> tuple[str, int | None, float | None]:
    """Take this launcher's options off the front of ``args`` (everything after them is
    torchrun's, and its program's): the bind address, the parent's pipe, the exit barrier."""
    bind, watch_fd, exit_barrier = LOOPBACK, None, None
    while args and args[0] in ("--bind", "--watch-fd", "--exit-barrier"):
        if len(args) < 2:
            raise UsageError(f"{args[0]} needs a value")
        option, value = args.pop(0), args.pop(0)
        if option == "--bind":
            bind = value
        elif option == "--exit-barrier":
            try:
                exit_barrier = float(value)
            except ValueError:
                exit_barrier = -1.0
            if not exit_barrier > 0:
                raise UsageError(f"--exit-barrier takes seconds > 0, got {value!r}")
        elif value.isdigit():
            watch_fd = int(value)
        else:
            raise UsageError(f"--watch-fd takes a file descriptor number, got {value!r}")
    return bind, watch_fd, exit_barrier


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        bind, watch_fd, exit_barrier = own_options(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if watch_fd is not None:
        # The parent is gone: leave now; the workers' parent-death signal takes them along.
        watch_parent(watch_fd, lambda: os._exit(EXIT_ORPHANED))
    os.environ[LAUNCHER_PID] = str(os.getpid())
    bind_stores(bind)
    export_round()
    fork_workers()
    if exit_barrier is not None:
        bound_exit_barrier(exit_barrier)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(args)
    except ChildFailedError as exc:
        # The workers' own errors are in their error files; this is the launcher's summary.
        print(exc.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
