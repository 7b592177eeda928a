"""flexunet vs sleap-nn on SLEAP's default UNet: inference, bfloat16, fast path, training, memory.

Same architecture on both sides (64 filters, 4 down / 4 up blocks, transposed convolutions,
34,512,128 parameters), batch 4 of 192x192x1, 2 threads. Every comparison is timed in this one
process as interleaved runs (the order rotates), and the medians are compared; the machine is
shared and noisy, so only ratios of medians are reported as results. The peer is sleap-nn's UNet
with its best standard idioms, the faster of: as written, and `channels_last` (model and input);
bf16 rows under `torch.autocast("cpu", torch.bfloat16)` on both sides, compared at the same
precision. (`bench_profiles.py` times every system in its own process, this default UNet included.)

    pip install --no-deps sleap-nn omegaconf antlr4-python3-runtime pyyaml loguru
    python benchmarks/bench_unet.py --repeats 7          # writes benchmarks/results/unet-<cpu>.json

Without sleap-nn installed, flexunet's own figures are still printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flexunet  # noqa: E402
from flexunet.summary import summarize  # noqa: E402
from machine import cpu_name, cpu_slug, describe  # noqa: E402
from peers import sleap_nn_default_unet  # noqa: E402

BATCH, SIDE = 4, 192


def interleaved(a, b, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of `a()` and `b()`, run alternately (a b, b a, ...) after warm-up."""
    times = interleaved_all({"a": a, "b": b}, repeats, warmup)
    return times["a"], times["b"]


def interleaved_all(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each callable, the order rotating every round, after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def best_peer(ours, peers: dict, repeats: int) -> tuple[float, float, str]:
    """(flexunet's median, the fastest peer's median, its name), all interleaved."""
    if not peers:
        return interleaved_all({"flexunet": ours}, repeats)["flexunet"], None, None
    times = interleaved_all({"flexunet": ours, **peers}, repeats)
    name = min(peers, key=times.get)
    return times["flexunet"], times[name], name


def roofline(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large square matrix product in `dtype`: the machine's practical peak."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def peer_output(out):
    return out["outputs"][-1] if isinstance(out, dict) else out


def training_step(model, x, target, peer=False):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.mse_loss(peer_output(out) if peer else out, target)
        loss.backward()
        optimizer.step()

    return step


def saved_activation_bytes(model, x, target) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training step."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.mse_loss(model(x), target)
    loss.backward()
    return sum(storages.values())


_PEAK_RSS = r"""
import torch, flexunet, torch.nn.functional as F
torch.set_num_threads(2)
model = flexunet.UNet().train().set_checkpointing({mode!r})
x, t = torch.rand(4, 1, 192, 192), torch.rand(4, 64, 192, 192)
def status(key):  # kB figures of /proc/self/status; VmHWM is this process's peak (getrusage's
    for line in open("/proc/self/status"):  # ru_maxrss would include the parent's, carried over exec)
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
F.mse_loss(model(x), t).backward()
print(status("VmHWM") - before)
"""


def peak_training_rss(mode) -> int:
    """Growth of peak resident memory over one training step, in a fresh process (bytes)."""
    code = _PEAK_RSS.format(mode=mode)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", default=None, help="results file (default benchmarks/results/unet-<cpu>.json)")
    args = parser.parse_args()
    cpu = cpu_name(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.rand(BATCH, 1, SIDE, SIDE)
    target = torch.rand(BATCH, 64, SIDE, SIDE)
    ours = flexunet.UNet().eval()
    peer = sleap_nn_default_unet()
    peer_cl = sleap_nn_default_unet()
    if peer is not None:
        peer_cl.load_state_dict(peer.state_dict())
        peer_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    gflop = summarize(ours, (1, SIDE, SIDE)).flops * BATCH / 1e9  # 57.1 GFLOP per image
    peak = {"fp32": roofline(torch.float32), "bf16": roofline(torch.bfloat16)}
    rows, results = [], {"cpu": cpu, "threads": args.threads,
                         "batch": BATCH, "side": SIDE, "gflop_per_batch": gflop, "roofline_gflops": peak,
                         "torch": torch.__version__, "cases": {}}

    def record(name, ours_s, peer_s, dtype, target_ratio=None, flops=gflop, extra=None, peer_name=None):
        ratio = peer_s / ours_s if peer_s else None
        if peer_name:
            extra = {**(extra or {}), "peer": peer_name}
        achieved = flops / ours_s
        case = {"flexunet_s": ours_s, "sleap_nn_s": peer_s, "ratio": ratio, "target": target_ratio,
                "gflops": achieved, "roofline_fraction": achieved / peak[dtype], **(extra or {})}
        results["cases"][name] = case
        rows.append((name, ours_s, peer_s, ratio, target_ratio, achieved, achieved / peak[dtype], extra or {}))

    def autocast(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()
        return run

    with torch.inference_mode():
        reference = ours(x)
        fp32_peers, bf16_peers = {}, {}
        if peer is not None:
            peer.eval(), peer_cl.eval()
            fp32_peers = {"sleap-nn": lambda: peer(x), "sleap-nn channels_last": lambda: peer_cl(x_cl)}
            bf16_peers = {f"{k} + bf16 autocast": autocast(fn) for k, fn in fp32_peers.items()}

        a, b, name = best_peer(lambda: ours(x), fp32_peers, args.repeats)
        record("inference fp32", a, b, "fp32", 1.5, peer_name=name)
        bf16 = autocast(lambda: ours(x))
        err = float((bf16().float() - reference).abs().max() / reference.abs().max())
        a, b, name = best_peer(bf16, bf16_peers, args.repeats)
        record("inference bf16 autocast", a, b, "bf16", 1.5, extra={"max_rel_error": err}, peer_name=name)

        # torch.compile keeps flexunet's operators and fuses around them: compared with flexunet's own eager.
        compiled = torch.compile(ours, fullgraph=True)
        err = float((compiled(x) - reference).abs().max() / reference.abs().max())
        a, b = interleaved(lambda: compiled(x), lambda: ours(x), args.repeats)
        record("torch.compile fp32", a, b, "fp32", 1.0, extra={"max_rel_error": err, "peer": "flexunet eager"})

        for dtype, name, goal, tol, peers in ((torch.float32, "fast path fp32", 1.5, 1e-4, fp32_peers),
                                              (torch.bfloat16, "fast path bf16", 1.5, 0.05, bf16_peers)):
            runner = flexunet.optimize_for_inference(ours, x, dtype)
            err = float((runner(x) - reference).abs().max() / reference.abs().max())
            a, b, peer_name = best_peer(lambda: runner(x), peers, args.repeats)
            record(name, a, b, "bf16" if dtype == torch.bfloat16 else "fp32", goal,
                   extra={"max_rel_error": err, "tolerance": tol}, peer_name=peer_name)

    ours.train()
    train_peers = {}
    if peer is not None:
        train_peers = {"sleap-nn": training_step(peer.train(), x, target, peer=True),
                       "sleap-nn channels_last": training_step(peer_cl.train(), x_cl, target, peer=True)}
    a, b, name = best_peer(training_step(ours, x, target), train_peers, max(3, args.repeats // 2))
    record("training step fp32", a, b, "fp32", 1.3, flops=3 * gflop, peer_name=name)
    a, b, name = best_peer(autocast(training_step(ours, x, target)),
                           {f"{k} + bf16 autocast": autocast(fn) for k, fn in train_peers.items()},
                           max(3, args.repeats // 2))
    record("training step bf16 autocast", a, b, "bf16", 1.3, flops=3 * gflop, peer_name=name)

    memory = {}
    for mode in (None, "stack", "block"):
        ours.set_checkpointing(mode)
        saved = saved_activation_bytes(ours, x, target)
        memory[str(mode)] = {"saved_activation_bytes": saved, "peak_rss_growth_bytes": peak_training_rss(mode)}
    ours.set_checkpointing(None)
    for mode in ("stack", "block"):
        plain = training_step(ours, x, target)
        ckpt_model = flexunet.UNet().train().set_checkpointing(mode)
        ckpt_model.load_state_dict(ours.state_dict())
        checkpointed = training_step(ckpt_model, x, target)
        a, b = interleaved(checkpointed, plain, max(3, args.repeats // 2))
        memory[mode]["extra_time"] = a / b - 1
        memory[mode]["activation_cut"] = 1 - memory[mode]["saved_activation_bytes"] / memory["None"]["saved_activation_bytes"]
    results["memory"] = memory

    print(f"flexunet {flexunet.__version__} vs sleap-nn, default UNet, batch {BATCH} @ {SIDE}x{SIDE}, "
          f"{args.threads} threads, torch {torch.__version__}; CPU: {describe(cpu)}")
    print(f"roofline (2048^3 matmul): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; "
          f"{gflop / BATCH:.1f} GFLOP per image")
    header = f"{'case':26} {'flexunet':>9} {'sleap-nn':>9} {'ratio':>6} {'target':>6} {'GFLOP/s':>8} {'roof':>5}  note"
    print(header)
    print("-" * len(header))
    for name, a, b, ratio, goal, gf, frac, extra in rows:
        note = f"max rel err {extra['max_rel_error']:.1e}" if "max_rel_error" in extra else ""
        if "peer" in extra:
            note += f"; peer column: {extra['peer']}"
        print(f"{name:26} {a:8.3f}s {(f'{b:.3f}s' if b else '-'):>9} {(f'{ratio:.2f}x' if ratio else '-'):>6} "
              f"{(f'{goal:.2f}x' if goal else ''):>6} {gf:8.0f} {frac:5.0%}  {note}")
    print()
    print("training step memory (one step, default UNet):")
    for mode, m in memory.items():
        line = (f"  checkpointing={mode:5}: activations kept for backward {m['saved_activation_bytes'] / 2**20:7.0f} MiB, "
                f"peak RSS growth {m['peak_rss_growth_bytes'] / 2**20:7.0f} MiB")
        if "extra_time" in m:
            line += f", cut {m['activation_cut']:.0%} at {m['extra_time']:+.0%} time"
        print(line)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"unet-{cpu_slug(cpu)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
