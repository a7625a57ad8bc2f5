"""The emulation's pure parts: rates, buckets, the link fit, the commands each node runs,
and the refusal to delete what it did not create (no root needed)."""

from __future__ import annotations

import itertools
import os

import pytest

from localsgd.emulation import (
    EmulatedCluster,
    EmulatedNetwork,
    EmulationError,
    NetworkSpec,
    fit_link,
    probe_sizes,
)
from localsgd.emulation.network import MIN_BURST, default_burst, parse_rate


def test_every_test_here_runs_in_the_emulation_group(request: pytest.FixtureRequest) -> None:
    """Under ``make test`` (pytest-xdist, ``--dist loadgroup``) the tests of this folder run
    on one worker, one after another (tests/conftest.py): pytest-xdist names a grouped
    test ``NODEID@GROUP``. A group added too late is not seen, and the clean-up of stale
    emulations in one module then meets another module's emulation."""
    # In a worker, pytest-xdist sets ``loadgroup`` when the session runs with --dist loadgroup.
    if not os.environ.get("PYTEST_XDIST_WORKER") or not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only pytest-xdist with --dist loadgroup groups tests (make test)")
    assert request.node.nodeid.endswith("@emulation"), request.node.nodeid


def test_rates_are_tc_rates() -> None:
    assert parse_rate("100mbit") == 1e8 and parse_rate("1gbit") == 1e9 and parse_rate("1Gbit") == 1e9
    assert parse_rate("12.5mbps") == 1e8  # bytes per second × 8
    for bad in ("100", "fast", "-1mbit", "0mbit", "1 gbit/s"):
        with pytest.raises(ValueError, match=r"rate must be a positive tc rate such as '100mbit'"):
            parse_rate(bad)


def test_buckets_hold_two_milliseconds_of_the_rate() -> None:
    assert default_burst(1e9) == 250_000  # 1 Gbit/s = 125 MB/s, × 2 ms
    assert default_burst(1e8) == 25_000
    assert default_burst(1e6) == MIN_BURST == 3028  # never under two full frames
    assert NetworkSpec(2, "1gbit").bucket() == 250_000 and NetworkSpec(2, "1gbit", 4096).bucket() == 4096


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, r"nodes must be an integer in \[1, 250\], got 0"),
        ({"nodes": 2, "rate": "fast"}, "rate must be a positive tc rate"),
        ({"nodes": 2, "rate": "1gbit", "burst": 100}, "burst must be an integer number of bytes >= 1500"),
    ],
)
def test_bad_specs_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetworkSpec(**kwargs)
    with pytest.raises(ValueError, match="procs_per_node must be an integer >= 1, got 0"):
        EmulatedCluster(2, 0)


def test_the_fit_recovers_alpha_and_beta_beyond_the_bucket() -> None:
    alpha, beta, bucket = 2e-4, 1.1e7, 25_000
    sizes = probe_sizes(1e8)
    assert (
        sizes[0] == 4096
        and sizes[-1] == 3_750_000
        and all(b == 4 * a for a, b in itertools.pairwise(sizes[:-1]))
    )
    # A ring over 2 ranks: T = 2α + max(n − bucket, 0)/β (the bucket's bytes pass at once).
    times = [2 * alpha + max(n - bucket, 0) / beta for n in sizes]
    fit = fit_link(sizes, times, 2, bucket)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.bandwidth == pytest.approx(beta, rel=1e-9)
    assert fit.worst_error == pytest.approx(0.0, abs=1e-9)
    assert fit.link.alpha == fit.alpha and fit.as_dict()["burst_bytes"] == bucket
    # Without a bucket, over 4 ranks: T = 6α + 1.5 n/β.
    times4 = [6 * alpha + 1.5 * n / beta for n in sizes]
    fit4 = fit_link(sizes, times4, 4)
    assert fit4.alpha == pytest.approx(alpha, rel=1e-9) and fit4.bandwidth == pytest.approx(beta, rel=1e-9)
    # Noise of ±5 % moves the estimates by about as much, not more.
    noisy = [t * (1.05 if i % 2 else 0.95) for i, t in enumerate(times)]
    rough = fit_link(sizes, noisy, 2, bucket)
    assert rough.bandwidth == pytest.approx(beta, rel=0.1) and rough.alpha == pytest.approx(alpha, rel=0.5)
    # One hiccup (a small all-reduce that took 10× as long) does not move the line.
    hiccup = [t * 10 if i == 1 else t for i, t in enumerate(times)]
    robust = fit_link(sizes, hiccup, 2, bucket)
    assert robust.bandwidth == pytest.approx(beta, rel=1e-3) and robust.alpha == pytest.approx(
        alpha, rel=1e-2
    )
    # A busy machine: every payload up to 4 MiB waited ~3 ms on the scheduler (measured so
    # on 2 shared cores); the line still rises with the two largest, as they do.
    busy_sizes = probe_sizes(None)
    busy = [3.70e-3, 3.13e-3, 3.44e-3, 3.82e-3, 3.32e-3, 2.89e-3, 2.23e-2, 4.59e-2]
    loaded = fit_link(busy_sizes, busy, 2)
    assert loaded.bandwidth > 0 and loaded.alpha >= 0
    assert loaded.predicted(busy_sizes[-1]) > 5 * loaded.predicted(busy_sizes[0])
    with pytest.raises(ValueError, match="at least two payload sizes"):
        fit_link([4096], [1e-3])
    with pytest.raises(ValueError, match="do not grow with the payload"):
        fit_link([4096, 8192, 16384], [3e-3, 2e-3, 1e-3])
    assert probe_sizes(None)[-1] == 32 * 2**20


def test_every_node_runs_torchrun_in_its_namespace_bound_to_its_own_link() -> None:
    cluster = EmulatedCluster(3, 2, "100mbit")
    net = cluster.network
    assert net.ident.startswith("lsgd") and len(net.ident) == 10
    assert net.nodes == [f"{net.ident}-node{i}" for i in range(3)]
    assert all(len(name) <= 15 for name in net.interfaces)  # Linux's limit on interface names
    commands = cluster.commands(["-m", "localsgd.worker", "cfg.json"], cluster.placement(), "rid")
    for i, command in enumerate(commands):
        assert command[:4] == ["ip", "netns", "exec", net.nodes[i]]
        text = " ".join(command)
        assert "--nnodes 3 --nproc-per-node 2 --rdzv-backend c10d" in text
        assert f"--rdzv-endpoint {net.addresses[0]}:29400 --rdzv-id rid" in text
        assert f"--rdzv-conf is_host={int(i == 0)} --local-addr {net.addresses[i]}" in text
        assert command[-3:] == ["-m", "localsgd.worker", "cfg.json"]
        env = cluster.node_env(i, {"RANK": "3", "MASTER_ADDR": "127.0.0.1", "PATH": "/bin"})
        assert env == {"PATH": "/bin", "GLOO_SOCKET_IFNAME": net.interfaces[i]}
    assert cluster.world_size == 6 and cluster.placement(2, 1).world_size == 2
    with pytest.raises(ValueError, match="cannot place 4 nodes"):
        cluster.placement(4)
    with pytest.raises(RuntimeError, match="not up"):
        cluster.run(["-m", "localsgd.worker"], log_dir=None)  # type: ignore[arg-type]


def test_it_refuses_to_delete_a_namespace_it_did_not_create() -> None:
    net = EmulatedNetwork(NetworkSpec(2), ident="lsgd00beef")
    other = EmulatedNetwork(NetworkSpec(2), ident="lsgd00cafe")
    for name in ("lsgd00beef-node0", "lsgd00cafe-node0", "eth0", "lsgd00beef-node0x"):
        assert not net.owns(name)
        with pytest.raises(EmulationError, match=f"refusing to delete network namespace '{name}'"):
            net.delete_namespace(name)
    net._created = ["lsgd00beef-node0"]
    assert net.owns("lsgd00beef-node0") and not other.owns("lsgd00beef-node0")
    with pytest.raises(ValueError, match="ident must look like lsgd"):
        EmulatedNetwork(NetworkSpec(1), ident="eth0")


def test_the_launchers_own_options_come_off_the_front_and_bad_ones_are_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from localsgd.engines.launching import elastic

    args = ["--bind", "10.77.0.1", "--exit-barrier", "10", "--watch-fd", "7", "--nnodes", "2", "-m", "x"]
    assert elastic.own_options(args) == ("10.77.0.1", 7, 10.0)
    assert args == ["--nnodes", "2", "-m", "x"]  # torchrun's, untouched
    assert elastic.own_options(["--nnodes", "2"]) == (elastic.LOOPBACK, None, None)
    for bad, message in [
        (["--exit-barrier", "soon"], "error: --exit-barrier takes seconds > 0, got 'soon'"),
        (["--exit-barrier", "0"], "error: --exit-barrier takes seconds > 0, got '0'"),
        (["--watch-fd", "x"], "error: --watch-fd takes a file descriptor number, got 'x'"),
        (["--bind"], "error: --bind needs a value"),
    ]:
        assert elastic.main(bad) == 2
        assert capsys.readouterr().err.strip() == message
