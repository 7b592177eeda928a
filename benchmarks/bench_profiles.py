"""flexunet vs sleap-nn and Keras on the UNets SLEAP users train: SLEAP's profiles at the sizes they run.

Each system runs in its own worker process (one per system, kept alive: TensorFlow's thread pools
would slow whatever ran after them in one process); the parent asks them for one timed call at a time,
rotating which goes first every round, and reports medians as ratios against the faster peer:

    python benchmarks/bench_profiles.py --rounds 5 --keras-python /path/to/tf/bin/python

Rows per case: fp32 inference (target 1.5x), bf16 inference under autocast (1.5x; its largest
difference to flexunet's fp32 output, as a fraction of the output's range, is printed too), an Adam
training step in fp32, MSE on the output (1.3x), and the same step under bf16 autocast (1.3x). Every
row is compared with the fastest peer at the same precision, and no row may fall below 1.0x. Peers,
each with its best standard idioms: sleap-nn's UNet with the same layout as written (`sleap-nn`) and
with `model.to(memory_format=torch.channels_last)` and channels-last input (`sleap-nn cl`), bf16 rows
under `torch.autocast("cpu", torch.bfloat16)` (`peers.py`; `pip install --no-deps sleap-nn omegaconf
antlr4-python3-runtime pyyaml loguru`); SLEAP's original layout in tf-keras, bf16 rows under the
`mixed_bfloat16` policy (`keras_peer.py`; an interpreter with `tensorflow` and `tf-keras`, given by
`--keras-python`). GFLOP/s count the direct convolutions (training: 3x the forward) against a
matrix-product roofline measured in the same run. Two more checks: time per megapixel of fp32
inference at 1024x1024 within 20% of that at 256x256 (same pixels per call), and flexunet on two
threads never slower than on one. The results file is named after the CPU (`machine.py`) and the
time of the run, so every run on every CPU kind is kept side by side in `benchmarks/results/`
(`tables.py` prints them, one table per CPU, with the range over its runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name, cpu_slug, describe  # noqa: E402

# name -> (UNet layout as the profile gives it, input (batch, side, channels)). From SLEAP's
# sleap/training_profiles/baseline*.json and sleap-nn's docs/sample_configs/*unet*.yaml (layouts
# that repeat another case's are left out); inputs are what these models see: instance crops at
# batch 16-32 for top-down, (scaled) full frames at batch 2-4 otherwise.
CASES = {
    "baseline.centroid (full frame 1024, scale 0.5)": (
        dict(filters=16, filters_rate=2, max_stride=16, output_stride=2), (2, 512, 1)),
    "baseline_medium_rf.topdown (crops 160)": (
        dict(filters=24, filters_rate=2, max_stride=16, output_stride=4), (16, 160, 1)),
    "baseline_large_rf.topdown (crops 192)": (
        dict(filters=24, filters_rate=1.5, max_stride=32, output_stride=4), (16, 192, 1)),
    "baseline_medium_rf.bottomup (full frame 512)": (
        dict(filters=16, filters_rate=2, max_stride=32, output_stride=4), (2, 512, 1)),
    "baseline_large_rf.bottomup (full frame 512)": (
        dict(filters=32, filters_rate=1.5, max_stride=64, output_stride=4), (2, 512, 1)),
    "baseline_medium_rf.single (full frame 512)": (
        dict(filters=16, filters_rate=2, max_stride=16, output_stride=4), (2, 512, 1)),
    "baseline_large_rf.single (full frame 384)": (
        dict(filters=32, filters_rate=1.5, max_stride=32, output_stride=4), (4, 384, 1)),
    "sleap-nn config_centroid_unet (scale 0.5 of 768)": (
        dict(filters=16, filters_rate=2, max_stride=16, output_stride=2), (4, 384, 1)),
    "sleap-nn config_topdown_centered_instance_unet (crops 128)": (
        dict(filters=16, filters_rate=1.5, max_stride=8, output_stride=2), (32, 128, 1)),
    "sleap-nn config_bottomup_unet (full frame 512)": (
        dict(filters=16, filters_rate=1.5, max_stride=8, output_stride=2), (2, 512, 1)),
    "SLEAP default UNet (transposed convs, batch 4 @ 192)": (
        dict(filters=64, filters_rate=2, max_stride=16, output_stride=1, up_interpolate=False), (4, 192, 1)),
}
MODES = ("inference fp32", "inference bf16", "training fp32", "training bf16")
TARGETS = {"inference fp32": 1.5, "inference bf16": 1.5, "training fp32": 1.3, "training bf16": 1.3}
FLOOR = 1.0  # no row below this, on any CPU
SYSTEMS = ("flexunet", "sleap-nn", "sleap-nn cl")
THREAD_MODES = ("inference fp32", "inference bf16", "training fp32")  # two threads never slower than one
SCALING = ((16, 256), (1, 1024))  # (batch, side): the same pixels per call, fp32 inference
SCALING_LIMIT = 1.2


# ----------------------------------------------------------------------------- worker


def _build(system: str, layout: dict, channels: int):
    import math

    import torch

    down = int(math.log2(layout["max_stride"]))
    up = int(math.log2(layout["max_stride"] // layout["output_stride"]))
    interpolate = layout.get("up_interpolate", True)
    if system == "flexunet":
        import flexunet

        return flexunet.UNet(filters=layout["filters"], filters_rate=layout["filters_rate"], down_blocks=down,
                             up_blocks=up, up_interpolate=interpolate, in_channels=channels)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import sleap_nn_unet_class

    cls = sleap_nn_unet_class()
    model = cls(in_channels=channels, output_stride=layout["output_stride"], kernel_size=3,
                filters=layout["filters"], filters_rate=layout["filters_rate"], down_blocks=down, up_blocks=up,
                stem_blocks=0, convs_per_block=2, middle_block=True, up_interpolate=interpolate)
    wrapped = torch.nn.Module()
    wrapped.net = model
    wrapped.forward = lambda x: model(x)["outputs"][-1] if up else model(x)["middle_output"]
    if system == "sleap-nn cl":  # the standard PyTorch idiom for convolutions on CPU
        wrapped.to(memory_format=torch.channels_last)
    return wrapped


def worker(system: str, threads: int) -> None:
    """Answer `case<TAB>request` lines on stdin with one number: the seconds of one timed call of a
    mode (`MODES`) or of `scale BATCH SIDE` (fp32 inference at that size); or, from flexunet, the
    model's `flops` per call, the `bf16 error` of its autocast output, and `roofline fp32|bf16`."""
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
        case, request = line.rstrip("\n").split("\t")
        if case == "roofline":
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from bench_unet import roofline

            print(roofline(torch.float32 if request == "fp32" else torch.bfloat16, repeats=3), flush=True)
            continue
        layout, (batch, side, channels) = CASES[case]
        if current != case:  # one case at a time: build it, drop the previous one
            model = _build(system, layout, channels)
            x = torch.rand(batch, channels, side, side)
            if system == "sleap-nn cl":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                target = torch.rand_like(model.eval()(x))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            current = case
        if request == "flops":
            import flexunet

            print(flexunet.summarize(model, (channels, side, side)).flops * batch, flush=True)
            continue
        if request == "bf16 error":
            with torch.inference_mode():
                full = model.eval()(x)
                with torch.autocast("cpu", torch.bfloat16):
                    low = model(x).float()
            print(float((low - full).abs().max() / (full.max() - full.min())), flush=True)
            continue
        inputs = x
        if request.startswith("scale"):
            n, s = map(int, request.split()[1:])
            inputs = torch.rand(n, channels, s, s)
            if system == "sleap-nn cl":
                inputs = inputs.contiguous(memory_format=torch.channels_last)

        def run():
            if request.startswith("training"):
                model.train()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", torch.bfloat16, enabled=request == "training bf16"):
                    loss = torch.nn.functional.mse_loss(model(inputs).float(), target)
                loss.backward()
                optimizer.step()
                return
            model.eval()
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=request == "inference bf16"):
                model(inputs)

        if (case, request) not in warm:  # the first call fills caches and allocator pools
            run()
            warm.add((case, request))
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


def _interleaved(workers: dict, case: str, request: str, rounds: int) -> dict:
    """Median seconds per worker of `rounds` calls, rotating which worker goes first."""
    names = list(workers)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(workers[name].time(case, request))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per system and row (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--keras-python", default=None,
                        help="a Python with tensorflow and tf-keras for the Keras peer (default: no Keras peer)")
    parser.add_argument("--cases", default=None,
                        help="only the cases whose name contains one of these comma-separated texts (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated rows (default: {','.join(MODES)})")
    parser.add_argument("--no-checks", action="store_true", help="skip the megapixel and thread-count checks")
    parser.add_argument("--peers", default=",".join(SYSTEMS[1:]),
                        help=f"comma-separated PyTorch peers (default: {','.join(SYSTEMS[1:])})")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads)
        return 0
    cases = [c for c in CASES if args.cases is None or any(t.strip() and t.strip() in c for t in args.cases.split(","))]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}; got {args.modes!r}")
    cpu = cpu_name(args.threads)
    print(f"CPU: {describe(cpu)}, {args.threads} threads", flush=True)
    chosen = [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(chosen) - set(SYSTEMS[1:]):
        parser.error(f"--peers takes {', '.join(SYSTEMS[1:])}; got {args.peers!r}")
    systems = {name: Worker(name, args.threads) for name in ("flexunet", *chosen)}
    if args.keras_python:
        systems["keras"] = Worker("keras", args.threads, args.keras_python)
    one_thread = Worker("flexunet", 1)
    peers = [name for name in systems if name != "flexunet"]
    results, scaling, threads = {}, {}, {}
    try:
        flexunet = systems["flexunet"]
        # Without bfloat16 hardware the bf16 matrix product is emulated (minutes, and no roofline): skipped.
        bf16_hw = bool({"avx512_bf16", "amx_bf16"} & set(cpu["flags"])) or "asimd" in cpu["flags"]
        roofline = {dtype: flexunet.time("roofline", dtype)
                    if any(m.endswith(dtype) for m in modes) and (dtype == "fp32" or bf16_hw) else float("nan")
                    for dtype in ("fp32", "bf16")}
        for case in cases:
            rows = results[case] = {"gflop": flexunet.time(case, "flops") / 1e9}
            for mode in modes:
                rows[mode] = _interleaved(systems, case, mode, args.rounds)
                print(f"  {case}: {mode}: " + ", ".join(f"{n} {t:.3f}s" for n, t in rows[mode].items()), flush=True)
            if "inference bf16" in modes:
                rows["bf16 error"] = flexunet.time(case, "bf16 error")
            if not args.no_checks:
                scaling[case] = {f"{n}x{s}": _interleaved({"flexunet": flexunet}, case, f"scale {n} {s}", args.rounds)
                                 ["flexunet"] / (n * s * s / 1e6) for n, s in SCALING}
                threads[case] = {mode: _interleaved({"1": one_thread, "2": flexunet}, case, mode, args.rounds)
                                 for mode in THREAD_MODES if mode in modes}
    finally:
        for w in [*systems.values(), one_thread]:
            w.close()
    short = _report(results, scaling, threads, peers, roofline, modes)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())  # every run kept: tables.py gives their range
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"profiles-{cpu_slug(cpu)}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import torch

    with open(path, "w") as f:
        json.dump({"cpu": cpu, "torch": torch.__version__, "commit": _commit(), "threads": args.threads,
                   "rounds": args.rounds,
                   "peers": peers, "roofline_gflops": roofline, "cases": results, "seconds_per_megapixel": scaling,
                   "one_vs_two_threads": threads, "short": short}, f, indent=2)
    print(f"wrote {path}")
    return 0


def _commit() -> str:
    """The flexunet commit measured (with `+changes` when the working tree differs from it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def _report(results: dict, scaling: dict, threads: dict, peers: list, roofline: dict, modes: list) -> list:
    """Print the three tables; return the rows that miss their targets."""
    short = []
    print(f"roofline (2048^3 matrix product): fp32 {roofline['fp32']:.0f} GFLOP/s, bf16 {roofline['bf16']:.0f} GFLOP/s")
    header = (f"{'case':58} {'row':15} {'flexunet':>9} " + " ".join(f"{p:>9}" for p in peers)
              + "  speed-up target  GFLOP/s roofline")
    print(header)
    print("-" * len(header))
    for case, rows in results.items():
        for mode in modes:
            ours = rows[mode]["flexunet"]
            peer_rows = rows[mode]  # every peer at the same precision
            fastest = min(peers, key=lambda p: peer_rows[p])
            ratio = peer_rows[fastest] / ours
            rows[mode]["speed_up"], rows[mode]["fastest_peer"] = ratio, fastest
            gflops = rows["gflop"] * (3 if mode.startswith("training") else 1) / ours
            fraction = gflops / roofline["bf16" if mode.endswith("bf16") else "fp32"]
            target = TARGETS.get(mode)
            missed = target is not None and ratio < target
            if missed:
                short.append(f"{case}: {mode} {ratio:.2f}x < {target}x (vs {fastest})"
                             + ("  BELOW 1.0x" if ratio < FLOOR else ""))
            cells = " ".join(f"{peer_rows[p]:8.3f}s" for p in peers)
            note = f"  error {rows['bf16 error']:.2%}" if mode == "inference bf16" and "bf16 error" in rows else ""
            note += f"  vs {fastest}"
            print(f"{case:58} {mode:15} {ours:8.3f}s {cells}  {ratio:6.2f}x "
                  f"{'' if target is None else f'{target:.1f}x':>6} {gflops:8.0f} {fraction:8.0%}"
                  f"{'  short' if missed else ''}{note}")
    print("\nseconds per megapixel, fp32 inference (1024x1024 within 20% of 256x256):")
    for case, row in scaling.items():
        (small, a), (large, b) = row.items()
        ok = b <= SCALING_LIMIT * a
        if not ok:
            short.append(f"{case}: {large} {b:.3f} s/MP > {SCALING_LIMIT} x {small} {a:.3f} s/MP")
        print(f"{case:58} {small} {a:.3f}  {large} {b:.3f}  ratio {b / a:.2f}{'' if ok else '  short'}")
    print("\none thread vs two (two never slower):")
    for case, rows in threads.items():
        for mode, t in rows.items():
            ok = t["2"] <= t["1"]
            if not ok:
                short.append(f"{case}: {mode} two threads {t['2']:.3f}s > one {t['1']:.3f}s")
            print(f"{case:58} {mode:15} 1: {t['1']:.3f}s  2: {t['2']:.3f}s  speed-up {t['1'] / t['2']:.2f}x"
                  f"{'' if ok else '  short'}")
    print(f"\n{len(short)} short" + "".join(f"\n  {line}" for line in short))
    return short


if __name__ == "__main__":
    sys.exit(main())
