"""DDP and context parallelism give the same step as one process on the whole batch / sequence."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

from attnlab.training.distributed import DistContext  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, tmp_path: Path) -> dict:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, ddp_worker.__file__, mode, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        try:
            p.wait(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed ranks hung")
        assert p.returncode == 0, p.stdout.read().decode()
    return load_file(tmp_path / f"{mode}.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "cp"])
def test_two_processes_take_the_single_process_step(mode, tmp_path):
    got = launch(mode, tmp_path)
    model = ddp_worker.make()
    loss = ddp_worker.step(model, ddp_worker.data(), DistContext.single(), tmp_path / "single")
    assert abs(float(got["loss"]) - loss) < 1e-6
    for name, p in model.named_parameters():  # the gradient each replica applied (after all-reduce)
        assert torch.allclose(got[f"grad.{name}"], p.grad, rtol=0, atol=1e-6), name
