"""One rank of the distributed training tests (run as a script by test_distributed.py)."""

import os
import sys

import torch
from safetensors.torch import save_file

from attnlab import ModelConfig, build_model
from attnlab.training.distributed import DistContext
from attnlab.training.losses import LMTask
from attnlab.training.trainer import TrainConfig, Trainer


class FixedTask:
    """Hands out one fixed batch: the test decides which rows each rank sees."""

    def __init__(self, batch):
        self.batch = batch

    def train_batch(self, batch_size, generator):
        return self.batch

    def eval_batches(self, n):
        return [self.batch]

    loss = staticmethod(LMTask.loss)

    def metrics(self, mean_loss):
        return {"loss": mean_loss}

    def evaluate_extra(self, model):
        return {}


def make(kernel="naive"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      attention_kernel=kernel)
    return build_model(cfg)


def data():
    return torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))


def step(model, batch, dist_ctx, out):
    cfg = TrainConfig(steps=1, batch_size=batch.shape[0], warmup=0, lr=1e-2, eval_every=1000, save_every=1000)
    trainer = Trainer(model, FixedTask(batch), cfg, out, dist_ctx=dist_ctx, progress=False)
    loss = trainer.train_step()
    return loss


def main():
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "ddp":  # each rank: half of the batch
        ctx = DistContext.from_env(1)
        batch = data()[ctx.rank * 2:(ctx.rank + 1) * 2]
        model = make()
    else:  # context parallel: the whole batch, each rank a shard of the sequence
        ctx = DistContext.from_env(2)
        batch = data()
        model = make("ring")
    loss = step(model, batch, ctx, out)
    if ctx.rank == 0:
        state = {f"grad.{k}": p.grad.contiguous() for k, p in model.named_parameters()}
        state["loss"] = torch.tensor([loss])
        save_file(state, os.path.join(out, f"{mode}.safetensors"))
    ctx.close()


if __name__ == "__main__":
    main()
