"""Two gloo processes, each holding half the batch, against one process holding all of it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocess import run_as_torchrun
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contrastive import distributed
from contrastive.losses import nt_xent

N, D, T = 8, 16, 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g), torch.randn(N, 12, generator=g)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = N // world
        z1, z2, x = _data()
        sl = slice(rank * n, (rank + 1) * n)
        # the loss itself: local anchors against globally gathered candidates
        a, b = z1[sl].clone().requires_grad_(), z2[sl].clone().requires_grad_()
        loss = nt_xent(a, b, T)
        loss.backward()
        # a model under DDP: gradients averaged over ranks must equal the single-process gradient
        torch.manual_seed(0)
        model = nn.Linear(12, D)
        ddp = DistributedDataParallel(model)
        x_local = x[sl]
        ddp_loss = nt_xent(ddp(x_local), ddp(x_local + 0.1), T)
        ddp_loss.backward()
        torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad, "ddp_loss": ddp_loss.detach(),
                    "w_grad": model.weight.grad, "b_grad": model.bias.grad,
                    "world": distributed.world_size(), "rank": distributed.rank(),
                    # one rank raising a stop flag stops every rank
                    "any": [distributed.any_rank(rank == 1, torch.device("cpu")),
                            distributed.any_rank(False, torch.device("cpu"))]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert [r["any"] for r in ranks] == [[True, False], [True, False]]

    z1, z2, x = _data()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    single = nt_xent(a, b, T)
    single.backward()
    # the whole-batch loss is the mean of the per-rank losses (equal local batch sizes)
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), rel=1e-6)
    # each rank's gradient for its own slice sums every rank's loss: world_size x the single gradient
    n = N // world
    for r, res in enumerate(ranks):
        sl = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(res["g1"] / world, a.grad[sl], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["g2"] / world, b.grad[sl], rtol=1e-5, atol=1e-7)

    torch.manual_seed(0)
    model = nn.Linear(12, D)
    loss = nt_xent(model(x), model(x + 0.1), T)
    loss.backward()
    assert torch.stack([r["ddp_loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    for res in ranks:  # DDP's averaged gradients are the single-process gradients, on every rank
        torch.testing.assert_close(res["w_grad"], model.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["b_grad"], model.bias.grad, rtol=1e-5, atol=1e-7)


def test_single_process_helpers_are_no_ops():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_with_grad(x) is x
    assert distributed.all_reduce_mean(x) is x
    y = torch.tensor([[3, -1], [7, 2]])
    for collective in (distributed.all_gather, distributed.all_reduce_sum, distributed.all_reduce_min,
                       distributed.broadcast):
        assert collective(y) is y and y.tolist() == [[3, -1], [7, 2]], collective.__name__
    assert distributed.broadcast(y, src=0) is y and distributed.any_rank(True, torch.device("cpu"))


def _collectives(out_dir: str) -> None:
    """Each collective on values that differ by rank; what every rank ends with goes to rank<r>.pt."""
    distributed.init_from_env(torch.device("cpu"), timeout_s=60)
    r = distributed.rank()
    summed = torch.tensor([1.0, 2.0]) * (r + 1)  # [1, 2] and [2, 4]
    low = torch.tensor([5 - 3 * r, r + 1])  # [5, 1] and [2, 2]
    from_0 = torch.full((3,), 10.0 * r + 1)  # [1, 1, 1] and [11, 11, 11]
    from_1 = torch.tensor([r + 7])  # [7] and [8]
    res = {"gather": distributed.all_gather(torch.arange(4).view(2, 2) + 100 * r),
           "sum_in_place": distributed.all_reduce_sum(summed) is summed,
           "min_in_place": distributed.all_reduce_min(low) is low,
           "broadcast_in_place": distributed.broadcast(from_0) is from_0,
           "from_1": distributed.broadcast(from_1, src=1),
           "mean": distributed.all_reduce_mean(torch.tensor([2.0 * r + 1])), "world": distributed.world_size()}
    torch.save({**res, "sum": summed, "min": low, "from_0": from_0}, os.path.join(out_dir, f"rank{r}.pt"))


def test_collectives_give_exact_values_over_two_processes(tmp_path):
    run_as_torchrun(_collectives, str(tmp_path))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["world"] == 2
        assert res["gather"].tolist() == [[0, 1], [2, 3], [100, 101], [102, 103]]  # rank order, rows kept
        assert res["sum"].tolist() == [3.0, 6.0] and res["min"].tolist() == [2, 1]
        assert res["from_0"].tolist() == [1.0, 1.0, 1.0] and res["from_1"].tolist() == [8]
        assert res["mean"].tolist() == [2.0]
        assert res["sum_in_place"] and res["min_in_place"] and res["broadcast_in_place"]


# ------------------------------------------------------------------------------------------------------------
# the whole trainer: a two-process DDP run ends with the weights of the single-process run

# Views made deterministic (full-image crop, no flip or colour), so that which process augments an image does
# not matter, and a model without batch norm, whose statistics would otherwise be per process.
DETERMINISTIC = ["views.crop_scale=[1.0,1.0]", "views.crop_ratio=[1.0,1.0]", "views.hflip_p=0",
                 "views.jitter_p=0", "views.grayscale_p=0", "data.image_size=8", "train.batch_size=64",
                 "train.epochs=2", "train.progress=false", "train.log_every=1", "optim.warmup_epochs=0.5",
                 "method.projection_bn=false", "method.projection_dim=8", "train.channels_last=false"]


def _run_trainer(output: str) -> None:
    from contrastive.configure import resolve_config
    from contrastive.methods import SimCLR, method_config
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = resolve_config(tree={"data": {"name": "digits"}}, overrides=DETERMINISTIC + [f"train.output={output}"])
    data = load_splits(cfg.data).pretrain
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    Trainer(cfg, SimCLR(backbone, 16, method_config(cfg)), data, output).fit()


@pytest.mark.slow
def test_trainer_two_processes_equal_one(tmp_path):
    from contrastive.training.checkpoint import load_checkpoint

    run_as_torchrun(_run_trainer, str(tmp_path / "ddp"))
    _run_trainer(str(tmp_path / "single"))
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert ddp["step"] == single["step"] == 2 * (1437 // 64)
    for k, v in single["method"].items():
        torch.testing.assert_close(ddp["method"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    # the logged losses (the mean over ranks) agree step by step
    def losses(p):
        rows = (p / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("loss")
        return [float(r.split(",")[col]) for r in rows[1:]]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
