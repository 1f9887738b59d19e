"""Ring attention: 2 and 4 gloo processes against single-process float64 attention."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnlab.attention.ring import (
    block_pairs,
    default_head_groups,
    head_groups_of,
    shard,
    shard_positions,
    unshard,
)

WORKER = Path(__file__).with_name("ring_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, tmp_path, mode: str = "check", limit: float = 240) -> list[dict]:
    port, out = free_port(), tmp_path / "result"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(out), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    deadline = time.time() + limit
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"ranks did not finish within {limit} s (a hang)")
    logs = [p.stdout.read().decode() for p in procs]
    results = []
    for r in range(world):
        path = Path(f"{out}.{r}.json")
        if mode == "dead" and r == 1:
            continue
        assert path.exists(), f"rank {r} wrote no result:\n{logs[r]}"
        results.append(json.loads(path.read_text()))
    return results


@pytest.mark.parametrize("world", [1, 2, 4])  # 1: a group of one must work too
def test_ring_equals_single_process_attention_and_training_step(world, tmp_path):
    for rank_result in run_ranks(world, tmp_path):
        for case, errs in rank_result["attention"].items():
            assert max(errs) < 1e-5, f"{case}: relative errors (out, dq, dk, dv) = {errs}"
        loss, ref_loss = rank_result["training"]["loss"]
        assert abs(loss - ref_loss) < 1e-5
        assert rank_result["training"]["grad_rel_err"] < 1e-5


def test_dead_rank_gives_an_error_within_the_timeout(tmp_path):
    start = time.time()
    (result,) = run_ranks(2, tmp_path, mode="dead", limit=90)
    assert result["error"] is not None and ("rank" in result["error"])
    assert result["seconds"] < 30 and time.time() - start < 90


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(layout):
    x = torch.arange(2 * 24).view(2, 24)
    parts = [shard(x, r, 3, layout=layout) for r in range(3)]
    assert torch.equal(unshard(parts, layout=layout), x)
    assert torch.equal(torch.cat([shard_positions(24, r, 3, layout=layout) for r in range(3)]).sort().values,
                       torch.arange(24))


def test_zigzag_balances_causal_work():
    P, tl = 4, 8

    def work(layout):
        return [sum(1 for src in range(P) for _ in block_pairs(r, src, P, layout, True, tl)) for r in range(P)]

    contiguous, zigzag = work("contiguous"), work("zigzag")
    assert contiguous == [1, 2, 3, 4]  # rank r computes r + 1 blocks: a 4x imbalance
    assert len(set(zigzag)) == 1  # every rank the same number of sub-blocks
    with pytest.raises(ValueError, match="divisible"):
        shard(torch.zeros(1, 10), 0, 4, layout="zigzag")


@pytest.mark.parametrize("batch, kv_heads, groups, expected",
                         [(1, 8, 8, 8), (2, 4, 3, 4), (3, 2, 2, 2), (2, 1, 5, 2), (1, 1, 1, 1), (4, 8, 100, 32)])
def test_head_groups_cover_every_batch_and_kv_head_pair_once(batch, kv_heads, groups, expected):
    parts = head_groups_of(batch, kv_heads, groups)
    assert len(parts) == expected
    seen = [(b, h) for bs, ks in parts for b in range(batch)[bs] for h in range(kv_heads)[ks]]
    assert sorted(seen) == [(b, h) for b in range(batch) for h in range(kv_heads)]
    x = torch.zeros(batch, kv_heads, 4, 2)
    assert all(x[bs, ks].is_contiguous() for bs, ks in parts)  # each group is sent without a copy


def test_default_head_groups_split_large_shards_only():
    assert default_head_groups(torch.zeros(2, 2, 16, 16)) == 1  # a tiny shard goes round in one piece
    assert default_head_groups(torch.zeros(1, 8, 4096, 64)) == 8  # the bench's P = 4 shard: 1/8 in flight
