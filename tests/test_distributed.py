"""DistributedDataParallel on CPU (gloo): ranks stay equal and match one process on the full batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import flexunet

STEPS, WORLD = 3, 2


def make_model():
    return flexunet.UNet(filters=8, down_blocks=2, up_blocks=2)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 32, 32, generator=g), torch.rand(4, 8, 32, 32, generator=g)


def train(model, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()


def worker(rank, port, initial, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = make_model()
    model.load_state_dict(initial)
    x, target = data()
    train(torch.nn.parallel.DistributedDataParallel(model), x.chunk(WORLD)[rank], target.chunk(WORLD)[rank])
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_on_the_full_batch(tmp_path):
    torch.manual_seed(0)
    initial = make_model().state_dict()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, initial, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = make_model()
    single.load_state_dict(initial)
    x, target = data()
    train(single, x, target)
    moved = False
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)  # ranks identical
        torch.testing.assert_close(states[0][key], value, rtol=1e-4, atol=1e-5)  # = full-batch training
        moved |= not torch.equal(value, initial[key])
    assert moved  # training did change the weights


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_keypoints.py"


def test_example_learns_the_keypoint():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "300", "--max-error", "1.5"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mean localization error" in result.stdout and "300/300" in result.stderr


def test_example_runs_under_torchrun():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(EXAMPLE), "--steps", "40"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes: 2" in result.stdout
