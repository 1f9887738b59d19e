"""One rank of the ring-attention tests: run as a script by test_ring.py (P processes on gloo).

Every rank builds the same full inputs from a seed, computes the float64 reference on the whole
sequence, runs ring attention on its shard, and writes the largest errors it saw to a JSON file.
"""

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from attnlab import ModelConfig, build_model
from attnlab.attention.kernels import naive_attention
from attnlab.attention.ring import ring_attention, shard, shard_positions


def attention_cases(rank, world):
    errors = {}
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            # head_groups=3: the (batch, kv head) pairs go round in groups (whole batch elements, or a batch
            # element's kv heads split, also with G = 2 query heads per kv head); None: the default (one group here)
            for kv_heads, head_groups in ((4, None), (1, None), (4, 3), (2, 3), (1, 3)):
                for padded in (False, True):
                    g = torch.Generator().manual_seed(len(errors))  # the same inputs on every rank
                    chunk = 7  # not a multiple of any tile size
                    T = chunk * world * (2 if layout == "zigzag" else 1)
                    q = torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64)
                    k = torch.randn(2, kv_heads, T, 16, generator=g, dtype=torch.float64)
                    v = torch.randn(2, kv_heads, T, 16, generator=g, dtype=torch.float64)
                    dout = torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64)
                    mask = torch.ones(2, T, dtype=torch.bool)
                    if padded:
                        mask[1, T - 5:] = False
                        mask[0, :3] = False
                    full = [t.clone().requires_grad_() for t in (q, k, v)]
                    ref, _ = naive_attention(*full, causal=causal, mask=mask if padded else None)
                    ref.backward(dout)
                    local = [shard(t.float(), rank, world, layout=layout, dim=2).requires_grad_() for t in (q, k, v)]
                    out = ring_attention(*local, causal=causal, layout=layout,
                                         key_padding_mask=shard(mask, rank, world, layout=layout, dim=1) if padded else None,
                                         timeout=60, head_groups=head_groups)
                    out.backward(shard(dout.float(), rank, world, layout=layout, dim=2))
                    name = f"{layout}-causal{causal}-kv{kv_heads}-groups{head_groups}-pad{padded}"
                    pairs = [(out, ref)] + [(loc.grad, f.grad) for loc, f in zip(local, full)]
                    errs = []
                    for got, want in pairs:
                        want = shard(want, rank, world, layout=layout, dim=2)
                        rel = float((got.detach().double() - want).abs().max() / want.abs().max().clamp_min(1e-12))
                        errs.append(rel)
                    errors[name] = errs
    return errors


def training_step_case(rank, world):
    """A context-parallel forward+backward of a whole decoder vs the single-process step."""
    torch.manual_seed(0)
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, position="rope")
    ref_model = build_model(ModelConfig(**base, attention_kernel="naive"))
    cp_model = build_model(ModelConfig(**base, attention_kernel="ring", ring_layout="zigzag"))
    cp_model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, 50, (2, 8 * world + 1), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    loss_fn = torch.nn.functional.cross_entropy
    ref_loss = loss_fn(ref_model(x).flatten(0, 1), y.flatten())
    ref_loss.backward()
    T = x.shape[1]
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    logits = cp_model(xs, position_ids=shard_positions(T, rank, world))
    # each rank's share of the mean loss; summed over ranks it is the full loss
    loss = loss_fn(logits.flatten(0, 1), ys.flatten(), reduction="sum") / y.numel()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grad_err = 0.0
    for p, pr in zip(cp_model.parameters(), ref_model.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        grad_err = max(grad_err, float((g - pr.grad).abs().max() / pr.grad.abs().max().clamp_min(1e-12)))
    return {"loss": [float(total), float(ref_loss)], "grad_rel_err": grad_err}


def main():
    rank, world, port, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    timeout = timedelta(seconds=8 if mode == "dead" else 120)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    torch.set_num_threads(1)
    result = {}
    if mode == "dead":
        if rank == 1:
            os._exit(0)  # this rank dies without a word
        start = time.time()
        try:
            q = torch.randn(1, 2, 8, 8)
            ring_attention(q, q, q, timeout=5)
            result["error"] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects the message
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["seconds"] = time.time() - start
    else:
        result["attention"] = attention_cases(rank, world)
        result["training"] = training_step_case(rank, world)
        dist.destroy_process_group()
    with open(f"{out}.{rank}.json", "w") as fh:
        json.dump(result, fh)
    os._exit(0)


if __name__ == "__main__":
    main()
