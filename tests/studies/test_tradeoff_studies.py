"""The streaming and compression study files expand to the designs they describe: K = 8,
local SGD and DiLoCo at H = 8, every F/τ/α point (τ up to H/F) or every codec with and
without error feedback, 3 seeds each, beside one worker and mini-batch SGD at K = 8."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from localsgd.comm.codecs import codec_names
from localsgd.studies.loading import load_study

STUDIES = Path(__file__).resolve().parents[2] / "studies"
PERIOD = 8


def _baselines(study) -> Counter:
    return Counter(
        (r.workers, r.algorithm["name"]) for r in study.runs if r.algorithm["name"] == "minibatch_sgd"
    )


def test_streaming_sweeps_fragments_overlap_and_mixing_up_to_h_over_f():
    study = load_study(STUDIES / "streaming.toml")
    assert _baselines(study) == {(1, "minibatch_sgd"): 3, (8, "minibatch_sgd"): 3}
    points = Counter(
        (r.algorithm["name"], r.algorithm["fragments"], r.algorithm["overlap"], r.algorithm["mixing"])
        for r in study.runs
        if r.algorithm["name"] != "minibatch_sgd"
    )
    expected = {
        (name, f, tau, alpha): 3
        for name in ("local_sgd", "diloco")
        for f in (1, 2, 4)
        for tau in (0, 1, PERIOD // f)
        for alpha in (0.0, 0.5)
    }
    assert points == expected
    assert len(study.runs) == 6 + 3 * len(expected) == 114
    assert {(r.workers, r.engine) for r in study.runs if r.algorithm["name"] != "minibatch_sgd"} == {
        (8, "simulated")
    }
    assert {r.algorithm["period"] for r in study.runs if "period" in r.algorithm} == {PERIOD}


def test_compression_tries_every_codec_with_and_without_error_feedback():
    study = load_study(STUDIES / "compression.toml")
    assert _baselines(study) == {(1, "minibatch_sgd"): 3, (8, "minibatch_sgd"): 3}
    points = Counter(
        (
            r.algorithm["name"],
            r.algorithm.get("compression", {}).get("codec", "none"),
            r.algorithm.get("compression", {}).get("error_feedback", False),
        )
        for r in study.runs
        if r.algorithm["name"] != "minibatch_sgd"
    )
    expected = {
        (name, codec, feedback): 3
        for name in ("local_sgd", "diloco")
        for codec in codec_names()
        for feedback in ((False,) if codec == "none" else (False, True))
    }
    assert points == expected
    assert {"int8", "int4", "topk"} <= {codec for _, codec, _ in points}
    assert len(study.runs) == 6 + 3 * len(expected)
