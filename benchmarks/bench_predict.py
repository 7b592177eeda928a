"""Frames per second end to end: `flexunet predict` vs `sleap-nn track`, video in, .slp out.

Each system runs as its own command-line process on the same models, video and frames, 2 threads,
float32 (`--bf16` adds flexunet's bfloat16 row). A run's fixed costs (start-up, model loading,
writing) are cancelled by timing each command on a short and a long frame range: frames/s is
(long - short frames) / (long - short seconds). Rounds alternate the order of the systems; the
medians over rounds are reported with their ratio. Workloads: top-down and bottom-up on
`centered_pair_small.mp4` (384x384), the Keras single-instance robot model on `small_robot.mp4`
(320x560 RGB, played four times over), and top-down on a synthetic 1024x1024 video (two moving blobs, written once with
sleap-io), which the models' size matching brings to 384x384.

    python -m venv /tmp/snn && /tmp/snn/bin/pip install torch==2.13.0 "torchvision==0.28.*" sleap-nn==0.3.5
    python benchmarks/bench_predict.py --sleap-nn /tmp/snn/bin/sleap-nn --rounds 3 --json benchmarks/results/predict.json

Without `--sleap-nn`, flexunet's own figures are printed. torchvision must match torch: the CPU
wheel of the PyTorch index, or a build of the same torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402

REFERENCE = Path(os.environ.get("FLEXUNET_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
NN = "sleapnn_models"
# name -> (video, models, frames of the long run). The robot video (166 frames) is played four times over
# (re-encoded once, the same file for both systems) so that its long run is long enough to time.
WORKLOADS = {
    "topdown 384x384": ("centered_pair_small.mp4",
                        [f"{NN}/minimal_instance_centroid", f"{NN}/minimal_instance_centered_instance"], 328),
    "bottomup 384x384": ("centered_pair_small.mp4", [f"{NN}/minimal_instance_bottomup"], 328),
    "keras single instance 320x560 RGB": ("small_robot.mp4 x4", ["sleap_models/minimal_robot.UNet.single_instance"],
                                          664),
    "topdown 1024x1024 (synthetic)": ("synthetic", [f"{NN}/minimal_instance_centroid",
                                                    f"{NN}/minimal_instance_centered_instance"], 248),
}


def synthetic_video(path: Path, frames: int, side: int = 1024) -> None:
    """Two bright elongated blobs moving on a dark, slightly noisy background."""
    import sleap_io as sio

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    video = np.zeros((frames, side, side, 1), np.uint8)
    for t in range(frames):
        image = rng.normal(20, 4, (side, side)).astype(np.float32)
        for k, (cx, cy) in enumerate([(300 + 2 * t, 400 + t), (700 - t, 600 - 2 * t)]):
            angle = 0.02 * t + k
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            image += 200 * np.exp(-(u / 60) ** 2 - (v / 20) ** 2)
        video[t, ..., 0] = np.clip(image, 0, 255).astype(np.uint8)
    sio.save_video(video, str(path), fps=30)


def looped_video(source: Path, path: Path, times: int) -> None:
    """`source` played `times` times over, as one video."""
    import sleap_io as sio

    video = sio.load_video(str(source))
    frames = video[0:int(video.shape[0])]
    sio.save_video(np.concatenate([frames] * times), str(path), fps=30)


def command(system: str, tool: str, video: str, models: list[str], frames: str, out: str, bf16: bool) -> list[str]:
    models = [str(REFERENCE / m) for m in models]
    if system == "sleap-nn":
        args = [tool, "track", "-i", video, "-o", out, "--frames", frames, "-d", "cpu", "-b", "4"]
        for m in models:
            args += ["-m", m]
        return args
    args = [sys.executable, "-m", "flexunet", "predict", video, "-o", out, "--frames", frames, "--no-progress"]
    for m in models:
        args += ["-m", m]
    return args + (["--bf16"] if bf16 else [])


def timed(args: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    start = time.perf_counter()
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{run.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sleap-nn", default=None, help="the sleap-nn executable (default: flexunet only)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload (default: 3)")
    parser.add_argument("--short", type=int, default=8, help="frames of the short run (default: 8)")
    parser.add_argument("--long", type=int, default=None,
                        help="frames of the long run (default: 328 at 384x384, 664 for the robot, 248 at 1024x1024)")
    parser.add_argument("--json", default=None, help="write the results here (default: none)")
    parser.add_argument("--only", default=None, help="run the workloads whose names contain one of these comma-separated words (default: all)")
    parser.add_argument("--bf16", action="store_true", help="add a flexunet --bf16 row (default: fp32 only)")
    args = parser.parse_args()
    systems = ["flexunet"] + (["flexunet --bf16"] if args.bf16 else []) + (["sleap-nn"] if args.sleap_nn else [])
    cpu = cpu_name()
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}), 2 threads; frames/s over the frames after the first "
          f"{args.short}, median of {args.rounds} rounds")
    results = {"cpu": cpu, "short": args.short, "rounds": args.rounds, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (video, models, long) in WORKLOADS.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            long = args.long or long
            if video == "synthetic":
                path = Path(tmp) / "synthetic_1024.mp4"
                synthetic_video(path, long)
                video = str(path)
            elif video.endswith(" x4"):
                path = Path(tmp) / "looped.mp4"
                looped_video(REFERENCE / "predictions" / video[:-3], path, 4)
                video = str(path)
            else:
                video = str(REFERENCE / "predictions" / video)
            import sleap_io as sio

            long = min(long, int(sio.load_video(video).shape[0]))
            fps: dict[str, list[float]] = {s: [] for s in systems}
            walls: dict[str, list[float]] = {s: [] for s in systems}
            for r in range(args.rounds):
                order = systems if r % 2 == 0 else systems[::-1]
                for system in order:
                    tool = args.sleap_nn if system == "sleap-nn" else None
                    base = "sleap-nn" if system == "sleap-nn" else "flexunet"
                    out = str(Path(tmp) / "out.slp")
                    short = timed(command(base, tool, video, models, f"0-{args.short - 1}", out,
                                          system.endswith("bf16")))
                    seconds = timed(command(base, tool, video, models, f"0-{long - 1}", out,
                                            system.endswith("bf16")))
                    fps[system].append((long - args.short) / (seconds - short))
                    walls[system].append(seconds)
            row = {s: {"fps": statistics.median(v), "fps_runs": v, "wall_long_s": statistics.median(walls[s]),
                       "frames": long} for s, v in fps.items()}
            line = ", ".join(f"{s} {row[s]['fps']:.1f} frames/s" for s in systems)
            if "sleap-nn" in row:
                ratio = row["flexunet"]["fps"] / row["sleap-nn"]["fps"]
                row["ratio_fp32"] = ratio
                wall = row["sleap-nn"]["wall_long_s"] / row["flexunet"]["wall_long_s"]
                row["ratio_wall"] = wall
                line += (f"; fp32 ratio {ratio:.2f}x (target 2x); whole run of {long} frames incl. start-up "
                         f"{row['flexunet']['wall_long_s']:.1f} s vs {row['sleap-nn']['wall_long_s']:.1f} s ({wall:.2f}x)")
            print(f"{name}: {line}", flush=True)
            results["workloads"][name] = row
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
