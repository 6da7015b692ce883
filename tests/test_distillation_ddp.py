"""The teacher-output cache (``DistillationModule(cache=True)``) and ``FeatureCache`` under 2-process DDP.

Each rank serves half the samples (``DistributedSampler``) and computes the outputs of those only;
``OutputCache.sync`` all-gathers them at the end of each epoch. After 2 epochs every rank must hold
the same, complete cache, equal to the frozen network's outputs computed directly, and the cache must
not change training: a cached run trains the same student as an uncached one.

The fits run in ``tests/distill_ddp_worker.py`` under ``strategy="ddp"`` (Lightning re-executes the
script for rank 1), as a subprocess, 2 CPU processes with gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from battery import _oracle_teacher
from distill_ddp_worker import N_SAMPLES, backbone, samples

HERE = Path(__file__).parent
#: What a process that aborts in its C++ teardown (a joinable gloo thread) prints.
_EXIT_ABORT = "terminate called without an active exception"
RUNS = ("cached", "uncached", "features", "plain")

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("distill_ddp")
    env = {**os.environ, "PYTHONPATH": str(HERE), "PL_DISABLE_FORK": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "distill_ddp_worker.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    finished = all((out / f"{run}_rank{r}.pt").exists() for run in RUNS for r in (0, 1))
    # Rarely a gloo worker aborts at interpreter exit, after every rank wrote its state (see test_battery).
    assert proc.returncode == 0 or (finished and _EXIT_ABORT in proc.stderr), proc.stderr[-3000:]
    # The memory-mapped files of FeatureCache(cache="disk") are removed when training ends.
    assert not any((out / "mmap").iterdir())
    return {run: [torch.load(out / f"{run}_rank{r}.pt", weights_only=True) for r in (0, 1)] for run in RUNS}


def _params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("param:")}


def _assert_complete_and_agree(ranks: list[dict[str, torch.Tensor]], expected: list[torch.Tensor]) -> None:
    r0, r1 = ranks
    assert r0.keys() == r1.keys()
    for rank in ranks:
        assert rank["filled"].shape == (N_SAMPLES,)
        assert bool(rank["filled"].all())
        # 4 batches per epoch per rank: computed in epoch 1 (misses), read back in epoch 2 (hits), so
        # the other rank's half came through the all-gather, not a local recomputation.
        assert int(rank["misses"]) == 4
        assert int(rank["hits"]) == 4
    assert [k for k in r0 if k.startswith("values:")] == [f"values:{k}" for k in range(len(expected))]
    for k, value in enumerate(expected):
        torch.testing.assert_close(r0[f"values:{k}"], r1[f"values:{k}"], rtol=0, atol=0)
        torch.testing.assert_close(r0[f"values:{k}"], value, rtol=0, atol=1e-5)


def test_teacher_cache_is_complete_identical_across_ranks_and_equals_the_teacher(
    states: dict[str, list[dict[str, torch.Tensor]]],
) -> None:
    x, _ = samples()
    with torch.no_grad():
        logits = _oracle_teacher()(x)
    # The logits and the hint feature of the teacher's Flatten layer (the flattened input).
    _assert_complete_and_agree(states["cached"], [logits, x.flatten(1)])


@pytest.mark.parametrize("run", ["cached", "uncached"])
def test_student_weights_are_identical_across_ranks(
    states: dict[str, list[dict[str, torch.Tensor]]], run: str
) -> None:
    r0, r1 = (_params(s) for s in states[run])
    student = [f"param:student.{n}" for n in ("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight")]
    assert sorted(r0) == ["param:adapters.fc1__to__0.weight", *student]  # the hint adapter trains too
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key


def test_cached_run_trains_the_same_student_as_an_uncached_run(
    states: dict[str, list[dict[str, torch.Tensor]]],
) -> None:
    cached, uncached = _params(states["cached"][0]), _params(states["uncached"][0])
    assert cached.keys() == uncached.keys()
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], rtol=0, atol=1e-5)


def test_feature_cache_is_complete_identical_across_ranks_and_equals_the_backbone(
    states: dict[str, list[dict[str, torch.Tensor]]],
) -> None:
    x, _ = samples()
    with torch.no_grad():
        expected = backbone()(x)
    _assert_complete_and_agree(states["features"], [expected])
    r0, r1 = (_params(s) for s in states["features"])
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    # The cache does not change training: the head equals the one trained without FeatureCache.
    plain = _params(states["plain"][0])
    assert plain.keys() == r0.keys()
    for key in r0:
        torch.testing.assert_close(r0[key], plain[key], rtol=0, atol=1e-5)
