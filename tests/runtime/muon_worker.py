"""Muon's split orthogonalisation and the chunked loss on 2 ranks, for tests/optim/test_muon_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/runtime/muon_worker.py OUT_JSON

One launch (the costly part: torchrun and every rank importing torch) runs every check and rank 0 writes what
each rank measured to OUT_JSON; the test asserts on it:
- exchange: the replicated (DDP) and row-sharded (FSDP2) orthogonalisations of the same matrices, against one
  process's, in float32 and bfloat16;
- train-ddp, train-fsdp: a tiny GPT trained a few Muon steps on 2 ranks beside a copy trained in this process
  alone (replicated=False, the same micro-batches accumulated): the largest weight difference;
- chunked-loss: an FSDP2 model's loss and gradients with the head and loss chunked and all at once.
Every Newton-Schulz call is counted (matrices per rank), so the test can tell each ran on one rank only.
"""

import copy
import json
import sys
from pathlib import Path

import torch

from gptrain.model import GPT, GPTConfig
from gptrain.optim import muon
from gptrain.runtime import distributed as dist_util

# Odd widths: 45-row matrices split 23/22 between the ranks; 3 layers give 3 matrices of a shape, which does not
# divide by 2 ranks.
CONFIG = dict(vocab_size=50, block_size=16, n_layer=3, n_head=3, n_embd=30, mlp_hidden=45, dropout=0.0)
# Shapes for the exchange alone: uneven rows, a matrix with fewer rows than ranks, tall and wide of one shape.
SHAPES = [(90, 30), (30, 30), (45, 30), (30, 45), (30, 30), (90, 30), (45, 30), (1, 7), (3, 7), (7, 3)]
STEPS = 3
CPU = torch.device("cpu")


class NewtonSchulzCounter:
    """Counts the matrices muon.newton_schulz orthogonalises, while `counting` is set."""

    def __init__(self):
        self.matrices, self.counting = 0, False
        self.original = muon.newton_schulz
        muon.newton_schulz = self

    def __call__(self, g, *args, **kwargs):
        if self.counting:
            self.matrices += g.size(0) if g.dim() == 3 else 1
        return self.original(g, *args, **kwargs)

    def count(self, fn, *args):
        """fn(*args), and the number of matrices it orthogonalised."""
        before, self.counting = self.matrices, True
        try:
            result = fn(*args)
        finally:
            self.counting = False
        return result, self.matrices - before


def exchange(ctx, counter) -> dict:
    """Each way of splitting against one process's orthogonalisation of the same (random, equal on every rank)
    matrices: the largest absolute difference, and the matrices this rank orthogonalised."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (ctx.world_size,))
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(shape, generator=generator) for shape in SHAPES]
    out = {}
    for name in ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        expected = [r.float() for r in muon.orthogonalise_stacks(matrices, 5, dtype)]
        # Each owner's matrices orthogonalised as its own batch, here: what the exchange must deliver bit for bit
        # (a smaller batch may round differently from one process's on some CPUs).
        as_owned = [None] * len(matrices)
        for indices in muon._plan(matrices, ctx.world_size):
            for i, r in zip(indices, muon.orthogonalise_stacks([matrices[i] for i in indices], 5, dtype)):
                as_owned[i] = r.float()
        replicated, ddp_count = counter.count(muon.orthogonalise_replicated, matrices, 5, dtype)
        shards = [distribute_tensor(m, mesh, [Shard(0)]) for m in matrices]
        sharded, fsdp_count = counter.count(muon.orthogonalise_sharded, shards, 5, dtype)
        full = [r.full_tensor() for r in sharded]

        def largest(results, reference):
            return max((r - e).abs().max().item() for r, e in zip(results, reference))

        out[name] = {
            "ddp": largest(replicated, expected), "fsdp": largest(full, expected),
            "ddp_as_owned": largest(replicated, as_owned), "fsdp_as_owned": largest(full, as_owned),
            "dtypes": sorted({str(r.dtype) for r in replicated + full}),
            "placements": all(tuple(r.placements) == (Shard(0),) for r in sharded),
            "ddp_matrices": ddp_count, "fsdp_matrices": fsdp_count,
        }
    return out


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train(ctx, parallel: str, counter) -> dict:
    """STEPS Muon steps on 2 ranks (rank r takes micro-batch r of each step) and in this process alone (both
    micro-batches accumulated, as the ranks' averaged gradient): the largest weight difference at the end."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    reference = copy.deepcopy(model)
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    wrapped = dist_util.wrap_model(model, parallel, ctx, CPU, torch.float32)
    settings = dict(weight_decay=0.1, adam_lr=1e-2, muon_lr=0.05, momentum=0.95, betas=(0.9, 0.95))
    optimizer = muon.build_muon(model, **settings)
    alone = muon.build_muon(reference, **settings, replicated=False)
    generator = torch.Generator().manual_seed(1)
    per_step, alone_per_step = [], []
    for _ in range(STEPS):
        rows = [torch.randint(0, CONFIG["vocab_size"], (2, CONFIG["block_size"] + 1), generator=generator)
                for _ in range(ctx.world_size)]
        _, loss = wrapped(rows[ctx.rank][:, :-1], rows[ctx.rank][:, 1:])
        loss.backward()
        per_step.append(counter.count(optimizer.step)[1])
        optimizer.zero_grad(set_to_none=True)
        for row in rows:
            _, loss = reference(row[:, :-1], row[:, 1:])
            (loss / ctx.world_size).backward()
        alone_per_step.append(counter.count(alone.step)[1])
        alone.zero_grad(set_to_none=True)
    weights = {name: full(p.detach()) for name, p in model.named_parameters()}
    expected = dict(reference.named_parameters())
    muon_params = optimizer.param_groups[0]["params"]
    names = {id(p): name for name, p in model.named_parameters()}
    differences = {k: (weights[k] - expected[k]).abs().max().item() for k in expected}
    return {
        "largest_difference": max(differences.values()),
        "largest_muon_difference": max(differences[names[id(p)]] for p in muon_params),
        "moved": min((expected[k] - initial[k]).abs().max().item() for k in expected),
        "matrices_per_step": per_step,
        "alone_matrices_per_step": alone_per_step,
        "muon_shapes": [list(p.shape) for p in muon_params],
        "muon_names": [names[id(p)] for p in muon_params],
        "sharded": [hasattr(p, "device_mesh") for p in muon_params],
    }


def chunked_loss(ctx, dtype: torch.dtype) -> dict:
    """An FSDP2 model (computing in `dtype`): its loss and full gradients with the head and loss chunked (7 rows at
    a time), by default (under FSDP2) and all at once (loss_chunk_rows=0: the loss before chunking)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, logit_softcap=15.0))
    dist_util.wrap_model(model, "fsdp", ctx, CPU, dtype)
    generator = torch.Generator().manual_seed(2 + ctx.rank)
    idx = torch.randint(0, CONFIG["vocab_size"], (3, CONFIG["block_size"]), generator=generator)
    targets = torch.randint(0, CONFIG["vocab_size"], (3, CONFIG["block_size"]), generator=generator)
    targets[0, :5] = -1  # not counted
    out = {}
    for name, rows in (("whole", 0), ("chunked", 7), ("default", None)):
        model.loss_chunk_rows = rows
        logits, loss = model(idx, targets)
        (loss / 2).backward()  # as gradient accumulation scales it
        grads = {n: full(p.grad) for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            eval_loss = model(idx, targets)[1].item()
        out[name] = {"loss": loss.item(), "eval_loss": eval_loss, "logits": logits is not None, "grads": grads}
    return out


def relative_difference(grads: dict, reference: dict) -> float:
    """The largest gradient difference, relative to the largest gradient of that tensor in the reference."""
    return max(((grads[k].float() - reference[k].float()).abs().max() / reference[k].float().abs().max()).item()
               for k in reference)


def compare_chunked_loss(ctx) -> dict:
    """Chunked and default against whole, in float32 and bfloat16; and bfloat16's own error (whole, against
    float32's whole), the yardstick for its chunked difference."""
    runs = {name: chunked_loss(ctx, getattr(torch, name)) for name in ("float32", "bfloat16")}
    result = {name: {"loss": {k: v["loss"] for k, v in run.items()},
                     "eval_loss": {k: v["eval_loss"] for k, v in run.items()},
                     "logits_returned": {k: v["logits"] for k, v in run.items()},
                     "grad_difference": {k: relative_difference(run[k]["grads"], run["whole"]["grads"])
                                         for k in ("chunked", "default")}}
              for name, run in runs.items()}
    bf16, fp32 = runs["bfloat16"]["whole"]["grads"], runs["float32"]["whole"]["grads"]
    result["bfloat16_error"] = relative_difference(bf16, fp32)
    return result


def main():
    ctx = dist_util.context_from_env()
    counter = NewtonSchulzCounter()
    with dist_util.process_group(ctx, CPU):
        result = {"rank": ctx.rank, "exchange": exchange(ctx, counter)}
        for parallel in ("ddp", "fsdp"):
            result[f"train-{parallel}"] = train(ctx, parallel, counter)
        result["chunked-loss"] = compare_chunked_loss(ctx)
        gathered = dist_util.all_gather_objects(result)
        if ctx.is_main:
            Path(sys.argv[1]).write_text(json.dumps(gathered, indent=1))


if __name__ == "__main__":
    main()
