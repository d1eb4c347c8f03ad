"""One rank of the two-process DistributedDataParallel test (tests/test_integration.py).

Usage: python tests/ddp_worker.py RANK WORLD_SIZE PORT WORKDIR

Reads WORKDIR/setup.pt (model config, initial state_dict, the full batch and targets), runs one
SGD step of DistributedDataParallel(MaxViT(fused=True)) on its shard of the batch with gloo on
127.0.0.1, once with the model in eval mode and once in train mode, and writes
WORKDIR/rank{RANK}.pt with the gradients, the parameters after the step and any fallback warnings.
"""

import os
import sys
import warnings

import torch

# The ranks run on the CPU, so the kernels run through the Triton interpreter (also on a CUDA
# machine); it must be on before any kernel module is imported.
os.environ["TRITON_INTERPRET"] = "1"

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from maxvit_fast import FusedFallbackWarning, MaxViT  # noqa: E402


def main(rank: int, world_size: int, port: int, workdir: str) -> None:
    torch.set_num_threads(1)
    setup = torch.load(os.path.join(workdir, "setup.pt"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        shard = setup["x"].shape[0] // world_size
        x = setup["x"][rank * shard:(rank + 1) * shard]
        target = setup["target"][rank * shard:(rank + 1) * shard]
        result = {}
        for mode in ("eval", "train"):
            model = MaxViT(**setup["config"], fused=True)
            model.load_state_dict(setup["state"])
            model.train(mode == "train")
            ddp = DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=setup["lr"])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = F.cross_entropy(ddp(x), target)
                loss.backward()
            result[mode] = dict(
                grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                fallbacks=[str(w.message) for w in caught if issubclass(w.category, FusedFallbackWarning)],
            )
            opt.step()
            result[mode]["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
