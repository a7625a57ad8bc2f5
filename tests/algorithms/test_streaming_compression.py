"""Streaming (F, τ, α) and compression together: a compressed sync does not stream yet, so
the combination is refused at the config, naming the algorithm's compression key; each
alone, and a codec of "none" beside streaming, still build."""

from __future__ import annotations

import pytest

from localsgd import algorithms as A
from localsgd.comm.codecs import NO_COMPRESSION, Compression
from localsgd.util.checks import ConfigError

PERIODIC = {
    "local_sgd": {"name": "local_sgd", "period": 4},
    "post_local_sgd": {"name": "post_local_sgd", "switch_step": 2, "period": 4},
    "hierarchical_local_sgd": {
        "name": "hierarchical_local_sgd",
        "period": 2,
        "block_period": 2,
        "block_size": 1,
    },
    "slowmo": {"name": "slowmo", "period": 4},
    "diloco": {"name": "diloco", "period": 4},
}
STREAMED = [{"fragments": 2}, {"overlap": 1}, {"mixing": 0.5}]
INT8 = {"codec": "int8", "error_feedback": True}


@pytest.mark.parametrize("name", sorted(PERIODIC))
@pytest.mark.parametrize("streamed", STREAMED, ids=["fragments", "overlap", "mixing"])
def test_a_codec_with_streaming_is_refused_naming_the_compression_key(name: str, streamed: dict) -> None:
    spec = {**PERIODIC[name], **streamed, "compression": INT8}
    with pytest.raises(
        ConfigError,
        match=rf"^{name}\.compression: a compressed sync does not stream yet \({name}\.fragments/overlap/mixing must be 1/0/0, got ",
    ):
        A.build(spec)


@pytest.mark.parametrize("name", sorted(PERIODIC))
def test_each_alone_and_codec_none_with_streaming_still_build(name: str) -> None:
    compressed = A.build({**PERIODIC[name], "compression": INT8})
    assert compressed.compression == Compression(codec="int8", error_feedback=True)  # type: ignore[attr-defined]
    assert (compressed.fragments, compressed.overlap, compressed.mixing) == (1, 0, 0.0)  # type: ignore[attr-defined]
    streamed = A.build(
        {**PERIODIC[name], "fragments": 2, "overlap": 1, "mixing": 0.5, "compression": {"codec": "none"}}
    )
    assert streamed.compression == NO_COMPRESSION  # type: ignore[attr-defined]
    assert A.build(streamed.to_dict()) == streamed
    assert A.build(compressed.to_dict()) == compressed
