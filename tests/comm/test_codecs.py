"""The codecs alone: payload sizes, error bounds, error feedback, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from localsgd import algorithms as A
from localsgd.comm.codecs import (
    FP8,
    Compression,
    MinMax,
    WireState,
    codec_names,
    make_codec,
    payload_bytes,
)
from localsgd.util.checks import ConfigError

CODECS = codec_names()[1:]
N = 1000  # not a multiple of the block: the last block is partial


def values(seed: int = 0, shape: tuple[int, ...] = (N,)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.01


@pytest.mark.parametrize("name", CODECS)
def test_payload_is_what_the_codec_says_and_rows_encode_alone(name):
    """A stack's row encodes and decodes to the bits the row alone gives (the simulated
    engine's replicas are the process engine's ranks)."""
    codec = make_codec(Compression(codec=name, block=64, ratio=0.05))
    x = values(1, (3, N))
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (3, codec.payload_bytes(N))
    for r in range(3):
        alone = codec.encode(x[r].clone())
        assert torch.equal(alone, payload[r])
        assert torch.equal(codec.decode(alone, N), codec.decode(payload, N)[r])


def test_bytes_per_sync_against_fp32():
    """int8 ≤ 0.27× and int4 ≤ 0.15× fp32's bytes at the default block of 256: n codes (n/2
    for 4 bits) plus an fp32 offset and scale per block."""
    n = 256 * 40
    fp32 = 4 * n
    int8 = payload_bytes(Compression(codec="int8"), n)
    int4 = payload_bytes(Compression(codec="int4"), n)
    assert int8 == n + 8 * 40 and int8 / fp32 == pytest.approx(0.2578125) and int8 / fp32 <= 0.27
    assert int4 == n // 2 + 8 * 40 and int4 / fp32 == pytest.approx(0.1328125) and int4 / fp32 <= 0.15
    assert payload_bytes(Compression(codec="fp16"), n) == 2 * n
    assert payload_bytes(Compression(codec="topk", ratio=0.01), n) == 8 * math.ceil(0.01 * n)
    assert payload_bytes(Compression(), n) == fp32
    odd = 1001  # 4 bits: the odd code shares a byte with nothing
    assert payload_bytes(Compression(codec="int4", block=256), odd) == 501 + 8 * 4


@pytest.mark.parametrize("bits", [8, 4])
def test_min_max_error_is_at_most_half_a_step_per_block(bits):
    block = 64
    codec = MinMax(bits, block)
    x = values(2)
    decoded = codec.decode(codec.encode(x), N)
    padded = torch.cat([x, x[-1:].expand(-N % block)]).view(-1, block)
    step = (padded.amax(1) - padded.amin(1)) / (2**bits - 1)
    err = (decoded - x).abs()
    err = torch.cat([err, err.new_zeros(-N % block)]).view(-1, block)
    # Half a step, and the float rounding of lo + q·s (a few ulps of the block's values).
    bound = step / 2 + 4 * torch.finfo(torch.float32).eps * padded.abs().amax(1)
    assert bool((err.amax(1) <= bound).all())
    assert float(err.max()) > 0.25 * float(step.max()) / 2  # it does quantize


def test_a_constant_block_decodes_exactly():
    codec = MinMax(8, 16)
    x = torch.full((40,), 0.125)
    assert torch.equal(codec.decode(codec.encode(x), 40), x)


def test_casts_round_to_nearest():
    x = values(3)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        codec = make_codec(Compression(codec=name))
        assert torch.equal(codec.decode(codec.encode(x), N), x.to(dtype).float())


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_fp8_error_is_within_e4m3_precision_of_each_block_max():
    block = 50
    codec = make_codec(Compression(codec="fp8", block=block))
    x = values(4)
    decoded = codec.decode(codec.encode(x), N)
    blocks_max = x.view(-1, block).abs().amax(1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4, and values far below the block's
    # max fall to its subnormal step, 2^-9 of 448 scaled.
    err = (decoded - x).view(-1, block).abs()
    bound = x.view(-1, block).abs() * 2**-4 + blocks_max / 448 * 2**-9 + 1e-12
    assert bool((err <= bound).all())


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    x = values(5)
    codec = make_codec(Compression(codec="topk", ratio=0.03))
    decoded = codec.decode(codec.encode(x), N)
    k = 30
    kept = decoded != 0
    assert int(kept.sum()) == k
    assert torch.equal(decoded[kept], x[kept])
    assert set(kept.nonzero().flatten().tolist()) == set(x.abs().topk(k).indices.tolist())


@pytest.mark.parametrize("name", ["int8", "int4", "topk"])
def test_error_feedback_keeps_the_sent_sum_within_one_residual_of_the_true_sum(name):
    """Σ sent = Σ true − e_T exactly (up to float rounding): the residual stays bounded while
    without feedback the error of the sum grows with the steps."""
    compression = Compression(codec=name, block=64, ratio=0.05)
    steps = 60
    errors = {}
    for feedback in (True, False):
        wire = WireState(Compression(**{**compression.__dict__, "error_feedback": feedback}))
        true_sum = torch.zeros(N)
        sent_sum = torch.zeros(N)
        for t in range(steps):
            x = values(100 + t) + 0.002  # a bias the codec drops the same way every time
            flat = x.clone()
            wire.exchange(0, flat, lambda p: [p])  # a world of one: the mean is what was sent
            true_sum += x
            sent_sum += flat
        errors[feedback] = float((true_sum - sent_sum).abs().max())
        if feedback:
            residual = wire.residuals[0]
            torch.testing.assert_close(true_sum - sent_sum, residual, rtol=0, atol=1e-5)
            assert float(residual.abs().max()) < 0.2  # bounded: about one step's values
    assert errors[True] * 5 < errors[False], errors


def test_residual_round_trips_through_the_state_dict():
    wire = WireState(Compression(codec="int8", block=64))
    wire.exchange(0, values(6), lambda p: [p])
    other = WireState(Compression(codec="int8", block=64))
    other.load_state_dict(wire.state_dict())
    a, b = values(7), values(7)
    wire.exchange(0, a, lambda p: [p])
    other.exchange(0, b, lambda p: [p])
    assert torch.equal(a, b) and torch.equal(wire.residuals[0], other.residuals[0])
    with pytest.raises(ValueError, match="residual 0 has shape"):
        other.exchange(0, values(8, (10,)), lambda p: [p])


def test_error_feedback_decodes_its_own_payload_once_more():
    wire = WireState(Compression(codec="int8", block=16))
    rows = torch.stack([values(20), values(21)])  # two replicas stacked, as the simulated engine
    done = wire.exchange(0, rows, lambda p: [p[:1], p[1:]])
    assert (done.nbytes, done.encoded, done.decoded) == (N + 8 * math.ceil(N / 16), N, 3 * N)


def test_the_mean_is_taken_in_member_order():
    wire = WireState(Compression(codec="fp16", error_feedback=False))
    members = [values(10 + j) for j in range(3)]
    payloads = [make_codec(wire.compression).encode(m) for m in members]
    flat = members[1].clone()
    done = wire.exchange(0, flat, lambda p: payloads)
    assert (done.nbytes, done.encoded, done.decoded) == (2 * N, N, 3 * N)
    assert done.codec_seconds > 0
    expected = ((members[0].half().float() + members[1].half().float()) + members[2].half().float()) / 3
    assert torch.equal(flat, expected)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"codec": "int3"}, r"local_sgd\.compression\.codec must be one of \['none', 'fp16', 'bf16', 'int8'"),
        ({"codec": "int8", "block": 1}, r"local_sgd\.compression\.block must be an integer >= 2, got 1"),
        (
            {"codec": "topk", "ratio": 0},
            r"local_sgd\.compression\.ratio must be a finite number > 0 and <= 1",
        ),
        ({"codec": "topk", "ratio": 1.5}, r"local_sgd\.compression\.ratio"),
        ({"error_feedback": "yes"}, r"local_sgd\.compression\.error_feedback must be true or false"),
        ({"bits": 4}, r"unknown key 'local_sgd\.compression\.bits'; allowed: \['block', 'codec'"),
    ],
)
def test_config_errors_name_the_dotted_key(table, message):
    with pytest.raises(ConfigError, match=message):
        A.build({"name": "local_sgd", "compression": table})


def test_compression_round_trips_and_labels():
    for name in (
        "local_sgd",
        "post_local_sgd",
        "hierarchical_local_sgd",
        "slowmo",
        "diloco",
        "minibatch_sgd",
    ):
        config = A.build({"name": name, "compression": {"codec": "int4", "block": 128}})
        assert config.compression == Compression(codec="int4", block=128)  # type: ignore[attr-defined]
        assert A.build(config.to_dict()) == config
        assert "compression=int4(block=128,ef)" in config.label()
        assert "compression" not in A.build({"name": name}).label()
    with pytest.raises(ConfigError, match=r"diloco\.compression\.codec"):
        A.DiLoCo(compression={"codec": "zip"})
