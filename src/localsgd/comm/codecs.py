"""Codecs for what crosses the wire: fp16, bf16, int8 and 4-bit min-max, fp8, top-k.

A codec turns a flat fp32 tensor ``[..., n]`` (one replica's values, or every replica's
stacked along leading dimensions) into a byte payload ``[..., B]`` and back. The leading
dimensions are only batched over: encoding row r of a stack gives the bytes encoding that
row alone gives, so the simulated engine's stacked replicas produce the process engine's
bits.

**Collective pattern.** A quantized payload cannot be summed by an all-reduce, and an
all-reduce in fp16/bf16 rounds at every addition in an order each backend chooses. Every
codec therefore takes the same path: each rank sends its payload in an **all-gather** (B
bytes handed to the collective, the figure ``CommStats.bytes`` counts), then every rank
decodes the K payloads and averages them itself, in rank order (``((d_0 + d_1) + ...) /
K`` in fp32). All ranks get the same bits, and so does the simulated engine, which stacks
the replicas and does the same elementwise arithmetic. A ring all-gather moves (K−1)·B
bytes per rank where a ring all-reduce of the fp32 values moves 2(K−1)/K·4n: the cost
model (:func:`localsgd.costmodel.model.scope_cost`) prices each pattern.

**Error feedback.** With ``error_feedback``, what the codec lost on this rank, e = x' −
decode(encode(x')) with x' = x + e, is kept and added before the next encode (Seide et
al. 2014; Karimireddy et al. 2019), so the transmitted values sum to the true ones up to
one residual. The residual is each rank's own, part of the algorithm's state dict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from localsgd.comm.base import Exchanged
from localsgd.util.checks import ConfigError, check_bool, check_choice, check_float, check_int
from localsgd.util.codec_names import CODECS

FP8 = getattr(torch, "float8_e4m3fn", None)
"""torch's fp8 e4m3 dtype where this torch has it (the ``fp8`` codec needs it)."""
FP8_MAX = 448.0
"""The largest finite e4m3fn value: an fp8 block is scaled so its largest magnitude lands here."""


def codec_names() -> list[str]:
    """The ``compression.codec`` values this torch supports."""
    return [name for name in CODECS if name != "fp8" or FP8 is not None]


def check_compression(
    prefix: str, codec: object, block: object, ratio: object, error_feedback: object
) -> None:
    check_choice(f"{prefix}.codec", codec, codec_names())
    check_int(f"{prefix}.block", block, 2)
    check_float(f"{prefix}.ratio", ratio, 0.0, 1.0, low_open=True, high_open=False)
    check_bool(f"{prefix}.error_feedback", error_feedback)


@dataclass(frozen=True)
class Compression:
    """How an algorithm compresses what it averages (see the module docstring).

    ``codec``: ``none`` (exact, today's all-reduce), ``fp16``/``bf16`` (a cast), ``int8``
    and ``int4`` (min-max quantization per block of ``block`` values, an fp32 offset and
    scale per block), ``fp8`` (e4m3, an fp32 scale per block), ``topk`` (the ``ratio``·n
    largest magnitudes, values and indices).
    """

    codec: str = "none"
    """The codec: one of :func:`codec_names`."""
    block: int = 256
    """Values per block of the int8/int4/fp8 scales (each block sends 8 or 4 bytes more)."""
    ratio: float = 0.01
    """topk: the fraction of values sent, k = ceil(ratio·n), in (0, 1]."""
    error_feedback: bool = True
    """Keep what the codec lost on this rank and add it before the next encode."""

    def __post_init__(self) -> None:
        check_compression("compression", self.codec, self.block, self.ratio, self.error_feedback)

    @property
    def enabled(self) -> bool:
        return self.codec != "none"

    def __str__(self) -> str:
        if not self.enabled:
            return "none"
        detail = f"k={self.ratio:g}n" if self.codec == "topk" else f"block={self.block}"
        if self.codec in ("fp16", "bf16"):
            detail = ""
        flags = [x for x in (detail, "ef" if self.error_feedback else "") if x]
        return f"{self.codec}({','.join(flags)})" if flags else self.codec


NO_COMPRESSION = Compression()


def resolve(algorithm: str, value: Compression | Mapping[str, Any]) -> Compression:
    """An algorithm's ``compression`` field as a :class:`Compression`; a plain table (TOML,
    a dict) is checked with errors naming ``<algorithm>.compression.<key>``."""
    if isinstance(value, Compression):
        return value
    prefix = f"{algorithm}.compression"
    if not isinstance(value, Mapping):
        raise ConfigError(f'{prefix} must be a table such as {{codec = "int8"}}, got {value!r}')
    allowed = {"codec", "block", "ratio", "error_feedback"}
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}.{unknown[0]}'; allowed: {sorted(allowed)}")
    merged = {
        "codec": NO_COMPRESSION.codec,
        "block": NO_COMPRESSION.block,
        "ratio": NO_COMPRESSION.ratio,
        "error_feedback": NO_COMPRESSION.error_feedback,
        **value,
    }
    if isinstance(merged["ratio"], int) and not isinstance(merged["ratio"], bool):
        merged["ratio"] = float(merged["ratio"])
    check_compression(prefix, merged["codec"], merged["block"], merged["ratio"], merged["error_feedback"])
    return Compression(**merged)


# -- codecs: [..., n] fp32 <-> [..., B] uint8 -----------------------------------------------


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _view(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes of ``payload`` ([..., m·itemsize]) read as ``dtype``; copied first when not
    aligned for it (a slice of a payload starts at any byte; a size-1 dimension of a view
    keeps its parent's stride)."""
    t = payload.contiguous()
    if t.storage_offset() % dtype.itemsize or any(st % dtype.itemsize for st in t.stride()[:-1]):
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(dtype)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` [..., n] as [..., nb, block], the last block padded with its last value (so
    padding never widens a block's range)."""
    n = x.shape[-1]
    pad = -n % block
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1)
    return x.unflatten(-1, (x.shape[-1] // block, block))


class Scratch:
    """Buffers a codec reuses from one exchange to the next, by name: a fresh allocation of
    a model-sized tensor on the CPU is fresh pages from the OS, and touching them costs as
    much as the codec's arithmetic (a compressed average then ran 1.6× slower inside a
    training loop than alone). Each named buffer lives as long as its codec."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        """The buffer ``name``, of ``shape`` and ``dtype`` on ``like``'s device, contents
        undefined (reallocated when any of them changed)."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return buf


class Cast:
    """fp16 / bf16: each value rounded to the narrower float; 2n bytes."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def payload_bytes(self, n: int) -> int:
        return 2 * n

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _bytes(x.to(self.dtype))

    def decode(self, payload: torch.Tensor, n: int, into: str | None = None) -> torch.Tensor:
        return _view(payload, self.dtype).float()


class MinMax:
    """int8 / int4 min-max quantization per block: q = round((x − lo)/s) with s = (hi −
    lo)/(2^bits − 1), decoded as lo + q·s (error ≤ s/2). Codes (n bytes, or ceil(n/2) for
    4 bits: two codes per byte, the even value in the low nibble) then each block's lo and s
    as fp32. Its model-sized intermediates live in :class:`Scratch` buffers."""

    def __init__(self, bits: int, block: int) -> None:
        self.bits = bits
        self.block = block
        self.levels = 2**bits - 1
        self.scratch = Scratch()

    def _code_bytes(self, n: int) -> int:
        return n if self.bits == 8 else (n + 1) // 2

    def payload_bytes(self, n: int) -> int:
        return self._code_bytes(n) + 8 * math.ceil(n / self.block)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n, lead = x.shape[-1], tuple(x.shape[:-1])
        nb = math.ceil(n / self.block)
        # x padded to whole blocks with its last value (so padding never widens a block's range).
        padded = self.scratch.get("padded", (*lead, nb * self.block), torch.float32, x)
        padded[..., :n].copy_(x)
        padded[..., n:].copy_(x[..., -1:].expand(*lead, nb * self.block - n))
        xb = padded.unflatten(-1, (nb, self.block))
        lo = xb.amin(-1)
        scale = (xb.amax(-1) - lo) / self.levels
        # A constant block: every code 0 decodes to lo exactly; any s > 0 avoids 0/0.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = self.scratch.get("q", tuple(xb.shape), torch.float32, x)
        torch.sub(xb, lo.unsqueeze(-1), out=q).div_(scale.unsqueeze(-1)).round_().clamp_(0, self.levels)
        values = q.flatten(-2)[..., :n]
        c = self._code_bytes(n)
        payload = torch.empty(*lead, self.payload_bytes(n), dtype=torch.uint8, device=x.device)
        codes = payload[..., :c]
        if self.bits == 8:
            codes.copy_(values)
        else:
            odd = n // 2
            codes[..., :odd].copy_(values[..., 1::2]).bitwise_left_shift_(4)
            codes[..., odd:].zero_()
            low = self.scratch.get("low", (*lead, c), torch.uint8, x)
            codes.bitwise_or_(low.copy_(values[..., 0::2]))
        payload[..., c : c + 4 * nb].copy_(_bytes(lo))
        payload[..., c + 4 * nb :].copy_(_bytes(scale))
        return payload

    def decode(self, payload: torch.Tensor, n: int, into: str | None = None) -> torch.Tensor:
        """The values of ``payload``: a fresh tensor, or with ``into`` a view of the scratch
        buffer of that name (valid until the next decode into it)."""
        nb = math.ceil(n / self.block)
        c = self._code_bytes(n)
        lead = tuple(payload.shape[:-1])
        codes = payload[..., :c]
        lo = _view(payload[..., c : c + 4 * nb], torch.float32)
        scale = _view(payload[..., c + 4 * nb : c + 8 * nb], torch.float32)
        shape = (*lead, nb * self.block)
        if into is None:
            q = torch.empty(shape, dtype=torch.float32, device=payload.device)
        else:
            q = self.scratch.get(into, shape, torch.float32, payload)
        if self.bits == 8:
            q[..., :n].copy_(codes)
        else:
            nibble = self.scratch.get("nibble", (*lead, c), torch.uint8, payload)
            q[..., 0:n:2].copy_(torch.bitwise_and(codes, 15, out=nibble))
            q[..., 1:n:2].copy_(torch.bitwise_right_shift(codes, 4, out=nibble)[..., : n // 2])
        q[..., n:].zero_()
        x = q.unflatten(-1, (nb, self.block)).mul_(scale.unsqueeze(-1)).add_(lo.unsqueeze(-1))
        return x.flatten(-2)[..., :n]


class Fp8:
    """fp8 e4m3 per block: x/s rounded to e4m3 with s = max|x|/448 per block (fp32); n bytes
    of codes plus 4 per block."""

    def __init__(self, block: int) -> None:
        assert FP8 is not None, "this torch has no float8_e4m3fn"
        self.dtype: torch.dtype = FP8
        self.block = block

    def payload_bytes(self, n: int) -> int:
        return n + 4 * math.ceil(n / self.block)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        xb = _blocks(x, self.block)
        scale = xb.abs().amax(-1) / FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scaled = (xb / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
        codes = _bytes(scaled.to(self.dtype)).flatten(-2)[..., :n]
        return torch.cat([codes, _bytes(scale)], -1)

    def decode(self, payload: torch.Tensor, n: int, into: str | None = None) -> torch.Tensor:
        nb = math.ceil(n / self.block)
        codes = payload[..., :n]
        scale = _view(payload[..., n : n + 4 * nb], torch.float32)
        pad = nb * self.block - n
        if pad:
            codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], -1)
        values = codes.contiguous().view(self.dtype).float().unflatten(-1, (nb, self.block))
        return (values * scale.unsqueeze(-1)).flatten(-2)[..., :n]


class TopK:
    """The k = ceil(ratio·n) largest magnitudes: their fp32 values, then their indices in
    ascending order (int32, int64 past 2³¹ values); 8k (or 12k) bytes. Decoded as zeros
    elsewhere."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def k(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.ratio * n)))

    @staticmethod
    def _index_dtype(n: int) -> torch.dtype:
        return torch.int32 if n < 2**31 else torch.int64

    def payload_bytes(self, n: int) -> int:
        k = self.k(n)
        return 4 * k + k * self._index_dtype(n).itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        idx = x.abs().topk(self.k(n), -1, sorted=False).indices.sort(-1).values
        values = x.gather(-1, idx)
        return torch.cat([_bytes(values), _bytes(idx.to(self._index_dtype(n)))], -1)

    def decode(self, payload: torch.Tensor, n: int, into: str | None = None) -> torch.Tensor:
        k = self.k(n)
        values = _view(payload[..., : 4 * k], torch.float32)
        idx = _view(payload[..., 4 * k :], self._index_dtype(n)).long()
        return values.new_zeros(*values.shape[:-1], n).scatter_(-1, idx, values)


Codec = Cast | MinMax | Fp8 | TopK


def make_codec(compression: Compression) -> Codec:
    """The codec a (compressing) :class:`Compression` names."""
    name = compression.codec
    if name == "fp16":
        return Cast(torch.float16)
    if name == "bf16":
        return Cast(torch.bfloat16)
    if name in ("int8", "int4"):
        return MinMax(8 if name == "int8" else 4, compression.block)
    if name == "fp8":
        return Fp8(compression.block)
    if name == "topk":
        return TopK(compression.ratio)
    raise ValueError(
        f"compression.codec {name!r} sends values as they are; allowed codecs: {codec_names()[1:]}"
    )


def payload_bytes(compression: Compression, n: int, itemsize: int = 4) -> int:
    """Bytes one rank sends to average ``n`` values (``itemsize`` each when uncompressed)."""
    return make_codec(compression).payload_bytes(n) if compression.enabled else n * itemsize


Gather = Callable[[torch.Tensor], list[torch.Tensor]]
"""A communicator's all-gather: this rank's payload in, every member's payload out, in
rank order, each shaped as the one sent or broadcastable to it (the simulated engine hands
a block's rows one [blocks, 1, B] view per member, decoded once per block)."""


class WireState:
    """A codec and each rank's residuals: what one call site of an algorithm averages through
    (its parameter deltas, its gradients). Communicators call :meth:`exchange`; the
    algorithm checkpoints :meth:`state_dict`."""

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self.codec = make_codec(compression)
        self.residuals: dict[int, torch.Tensor] = {}
        self.scratch = Scratch()

    @torch.no_grad()
    def exchange(self, slot: int, flat: torch.Tensor, gather: Gather) -> Exchanged:
        """Replace ``flat`` ([..., n]; ``slot``: which of the call's dtype groups) with the
        mean over the scope of every member's decoded payload; return what it cost one
        replica: the payload's bytes, the values it encoded and decoded, and the seconds of
        that work (the gather's excluded; with several replicas stacked, their time shared
        out evenly)."""
        start = time.perf_counter()
        n = flat.shape[-1]
        x = self.scratch.get(f"x{slot}", tuple(flat.shape), torch.float32, flat).copy_(flat)
        # Kept as [replicas, n] (or [n]): a communicator may lay the replicas out by scope.
        rows = x.view(-1, n) if x.dim() > 1 else x
        residual = self.residuals.get(slot)
        ef = self.compression.error_feedback
        if ef and residual is not None:
            if residual.shape != rows.shape:
                raise ValueError(
                    f"compression residual {slot} has shape {tuple(residual.shape)}, "
                    f"the averaged values {tuple(rows.shape)}: was the state saved by another model?"
                )
            rows.add_(residual.to(x.device))
        payload = self.codec.encode(x)
        if ef:
            if residual is None or residual.device != x.device:
                residual = self.residuals[slot] = torch.empty_like(rows)
            residual.copy_(rows).sub_(self.codec.decode(payload, n, "decoded").reshape(rows.shape))
        sent = time.perf_counter()
        gathered = gather(payload)
        received = time.perf_counter()
        # Rank order, one addition at a time: the same bits on every rank and engine.
        mean = self.codec.decode(gathered[0], n, "mean")
        for other in gathered[1:]:
            mean.add_(self.codec.decode(other, n, "decoded"))
        mean.div_(len(gathered))
        flat.copy_(mean)
        seconds = (sent - start) + (time.perf_counter() - received)
        replicas = rows.shape[0] if rows.dim() > 1 else 1
        decoded = n * (len(gathered) + int(self.compression.error_feedback))
        return Exchanged(int(payload.shape[-1]), n, decoded, seconds / replicas)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {slot: r.clone() for slot, r in self.residuals.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "residuals" not in state:
            raise ValueError("compression state is missing 'residuals'; was it saved with error feedback?")
        self.residuals = {int(slot): r.detach().clone() for slot, r in state["residuals"].items()}


def measure_codec(compression: Compression, n: int = 2**20, reps: int = 5) -> tuple[float, float]:
    """This machine's (encode, decode) seconds per value for ``compression`` (the terms of
    :class:`localsgd.costmodel.model.CodecCost`), on the CPU in this process's threads:
    the medians of ``reps`` exchanges of ``n`` values with 1, 2, 4 and 8 members' payloads
    (copies of its own; no transfer), fitted by least squares as encode·n + decode·decoded,
    each clamped at 0 (other work on a busy machine can tilt the fit).
    Encode takes whatever does not grow with the members (the copies in and out, the
    residual's update)."""
    state = WireState(compression)
    values = torch.randn(n, generator=torch.Generator().manual_seed(0))
    points = []
    for members in (1, 2, 4, 8):

        def copies_of(payload: torch.Tensor, m: int = members) -> list[torch.Tensor]:
            return [payload.clone() for _ in range(m)]

        times = []
        for _ in range(reps + 1):  # the first call warms the allocator
            done = state.exchange(0, values.clone(), copies_of)
            times.append(done.codec_seconds)
        points.append((done.decoded / n, sorted(times[1:])[reps // 2]))
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    decode = max(0.0, slope / n)
    encode = max(0.0, (my - slope * mx) / n)
    return encode, decode
