"""flexunet vs sleap-nn and Keras on the UNets SLEAP users train: SLEAP's profiles at the sizes they run.

Each system runs in its own worker process (one per system, kept alive: TensorFlow's thread pools
would slow whatever ran after them in one process); the parent asks them for one timed call at a time,
rotating which goes first every round, and reports medians as ratios against the faster peer:

    python benchmarks/bench_profiles.py --rounds 5 --keras-python /path/to/tf/bin/python

Rows per case: fp32 inference (target 1.5x), bf16 autocast inference against the peer's fp32 (2.5x)
and an Adam training step in fp32, MSE on the output (1.3x). Peers: sleap-nn's UNet with the same
layout (`peers.py`; `pip install --no-deps sleap-nn omegaconf antlr4-python3-runtime pyyaml loguru`),
and SLEAP's original layout in tf-keras (`keras_peer.py`; an interpreter with `tensorflow` and
`tf-keras`, given by `--keras-python`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (UNet layout as SLEAP's profile gives it, input (batch, side, channels)).
# From SLEAP's sleap/training_profiles and sleap-nn's docs/sample_configs; input sizes are the
# ones these models see: instance crops for top-down, scaled full frames otherwise.
CASES = {
    "baseline.centroid (full frame 1024, scale 0.5)": (
        dict(filters=16, filters_rate=2, max_stride=16, output_stride=2), (2, 512, 1)),
    "baseline_medium_rf.topdown (crops 160)": (
        dict(filters=24, filters_rate=2, max_stride=16, output_stride=4), (16, 160, 1)),
    "baseline_large_rf.topdown (crops 192)": (
        dict(filters=24, filters_rate=1.5, max_stride=32, output_stride=4), (16, 192, 1)),
    "baseline_medium_rf.bottomup (full frame 512)": (
        dict(filters=16, filters_rate=2, max_stride=32, output_stride=4), (2, 512, 1)),
    "sleap-nn config_centroid_unet (scale 0.5 of 768)": (
        dict(filters=16, filters_rate=2, max_stride=16, output_stride=2), (4, 384, 1)),
}
MODES = ("inference fp32", "inference bf16", "training fp32")
TARGETS = {"inference fp32": 1.5, "inference bf16": 2.5, "training fp32": 1.3}
PEER_MODES = ("inference fp32", "training fp32")  # peers are compared in fp32


# ----------------------------------------------------------------------------- worker


def _build(system: str, layout: dict, channels: int):
    import math

    import torch

    down = int(math.log2(layout["max_stride"]))
    up = int(math.log2(layout["max_stride"] // layout["output_stride"]))
    if system == "flexunet":
        import flexunet

        return flexunet.UNet(filters=layout["filters"], filters_rate=layout["filters_rate"], down_blocks=down,
                             up_blocks=up, up_interpolate=True, in_channels=channels)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import sleap_nn_unet_class

    cls = sleap_nn_unet_class()
    model = cls(in_channels=channels, output_stride=layout["output_stride"], kernel_size=3,
                filters=layout["filters"], filters_rate=layout["filters_rate"], down_blocks=down, up_blocks=up,
                stem_blocks=0, convs_per_block=2, middle_block=True, up_interpolate=True)
    wrapped = torch.nn.Module()
    wrapped.net = model
    wrapped.forward = lambda x: model(x)["outputs"][-1] if up else model(x)["middle_output"]
    return wrapped


def worker(system: str, threads: int) -> None:
    """Answer `case<TAB>mode` lines on stdin with the seconds of one timed call."""
    if system == "keras":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from keras_peer import worker as keras_worker

        keras_worker(CASES, threads, sys.stdin, sys.stdout)
        return
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    current, warm = None, set()
    for line in sys.stdin:
        case, mode = line.rstrip("\n").split("\t")
        layout, (batch, side, channels) = CASES[case]
        if current != case:  # one case at a time: build it, drop the previous one
            model = _build(system, layout, channels)
            x = torch.rand(batch, channels, side, side)
            with torch.no_grad():
                target = torch.rand_like(model.eval()(x))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            current = case

        def run():
            if mode == "training fp32":
                model.train()
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(x), target).backward()
                optimizer.step()
                return
            model.eval()
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=mode == "inference bf16"):
                model(x)

        if (case, mode) not in warm:  # the first call fills caches and allocator pools
            run()
            warm.add((case, mode))
        start = time.perf_counter()
        run()
        print(time.perf_counter() - start, flush=True)


# ----------------------------------------------------------------------------- parent


class Worker:
    def __init__(self, system: str, threads: int, python: str = sys.executable):
        self.process = subprocess.Popen([python, os.path.abspath(__file__), "--worker", system,
                                         "--threads", str(threads)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def time(self, case: str, mode: str) -> float:
        self.process.stdin.write(f"{case}\t{mode}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("a benchmark worker died; run it alone to see why")
        return float(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per system and row (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--keras-python", default=None,
                        help="a Python with tensorflow and tf-keras for the Keras peer (default: no Keras peer)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads)
        return 0
    systems = {name: Worker(name, args.threads) for name in ("flexunet", "sleap-nn")}
    if args.keras_python:
        systems["keras"] = Worker("keras", args.threads, args.keras_python)
    peers = [name for name in systems if name != "flexunet"]
    results = {}
    try:
        for case in CASES:
            for mode in MODES:
                names = [n for n in systems if n == "flexunet" or mode in PEER_MODES]
                times = {name: [] for name in names}
                for r in range(args.rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                        times[name].append(systems[name].time(case, mode))
                results.setdefault(case, {})[mode] = {name: statistics.median(t) for name, t in times.items()}
    finally:
        for w in systems.values():
            w.close()
    header = f"{'case':50} {'row':15} {'flexunet':>9} " + " ".join(f"{p:>9}" for p in peers) + "  speed-up target"
    print(header)
    print("-" * len(header))
    for case, rows in results.items():
        for mode in MODES:
            ours = rows[mode]["flexunet"]
            peer_mode = "inference fp32" if mode == "inference bf16" else mode  # bf16 against the peers' fp32
            faster = min(rows[peer_mode][p] for p in peers)
            ratio = faster / ours
            rows[mode]["speed_up"] = ratio
            cells = " ".join(f"{rows[peer_mode][p]:8.3f}s" for p in peers)
            mark = "" if ratio >= TARGETS[mode] else "  short"
            print(f"{case:50} {mode:15} {ours:8.3f}s {cells}  {ratio:6.2f}x {TARGETS[mode]:5.1f}x{mark}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "peers": peers, "cases": results}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
