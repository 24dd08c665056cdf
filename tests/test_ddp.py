"""A minimized model trains under DistributedDataParallel (CPU, gloo, two processes): gradients are
all-reduced, so both ranks hold identical parameters after steps on different data."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


def _minimized_model() -> nn.Module:
    """The same pruned-then-minimized MLP on every rank (seeded), with an input gather inside."""
    import sqr_fx
    from sqr_fx.prune import prune

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 4)).eval()
    with torch.no_grad():
        net[0].weight[:, :5] = 0  # five input features nobody reads -> gathered away
    prune(net, 0.7, "layer")
    return sqr_fx.minimize(net, (torch.randn(8, 30),))


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        # the pickled GraphModule needs only torch to load: the ranks skip importing sqr_fx
        model = torch.load(os.path.join(out_dir, "model.pt"), weights_only=False).train()
        start = [p.detach().clone() for p in model.parameters()]
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(3):
            x, y = torch.randn(16, 30, generator=gen), torch.randint(0, 4, (16,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        torch.save({"gathered": gathered, "moved": [not torch.equal(s, p) for s, p in zip(start, model.parameters())],
                    "shapes": [tuple(p.shape) for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other is still in it (a teardown abort, seen once in CI)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_two_processes_keep_parameters_identical(tmp_path):
    local = _minimized_model()
    torch.save(local, tmp_path / "model.pt")
    mp.spawn(_worker, args=(str(tmp_path / "rdv"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in results:
        assert torch.equal(res["gathered"][0], res["gathered"][1])  # ranks agree bit for bit
        assert all(res["moved"])  # every parameter trained
    assert results[0]["shapes"][0] == (40, 25)  # it really is the minimized model (5 inputs gone)
    assert [tuple(p.shape) for p in local.parameters()] == results[0]["shapes"]
