"""`flexunet` command line: a thin shell over the library.

    flexunet summary [--config FILE] [--input-shape H W C]
    flexunet convert MODEL_DIR OUT
    flexunet predict VIDEO -m MODEL [-m MODEL] -o OUT.slp [--frames 0-7] [...]
    flexunet kernels [--measure] [--config FILE] [--input-shape H W C] [--batch N] [--bf16] [--clear]

Errors print one line on stderr and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

EXIT_USAGE = 2


def _summary(args: argparse.Namespace) -> None:
    from flexunet.summary import summarize

    model = _model_for_summary(args.config, args.input_shape)
    shape = tuple(args.input_shape) if args.input_shape else None
    print(summarize(model, input_shape=shape))


def _model_for_summary(config: Optional[str], input_shape: Optional[list[int]]):
    from flexunet.nn.unet import UNet

    channels = input_shape[2] if input_shape else None
    if config is None:
        return UNet(in_channels=channels or 1)
    from flexunet.io.config_files import model_from_config_file
    from flexunet.io.folders import KERAS_FILES, SLEAP_NN_FILES

    path = os.path.abspath(config)
    # A model folder, or the training config inside one with its weights: they say the input channels.
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    beside_weights = os.path.basename(path) in (KERAS_FILES[0], SLEAP_NN_FILES[0]) and any(
        os.path.isfile(os.path.join(folder, files[1])) for files in (KERAS_FILES, SLEAP_NN_FILES))
    if os.path.isdir(path) or beside_weights:
        model = _load_folder(folder)
        if channels is not None and channels != model.in_channels:
            raise ValueError(f"--input-shape has {channels} channels, but the model in {folder} takes "
                             f"{model.in_channels}.")
        return model
    return model_from_config_file(config, in_channels=channels)


def _load_folder(folder: str):
    """A SLEAP (Keras or sleap-nn) model folder, or a flexunet directory."""
    from flexunet.io.folders import load_any

    return load_any(folder)


def _convert(args: argparse.Namespace) -> None:
    if args.keypoints:
        return _convert_keypoints(args)
    if args.second_model or args.frame_shape or args.max_instances is not None:
        raise ValueError("--with, --frame-shape and --max-instances go with --keypoints.")
    import torch

    from flexunet.export import export_onnx
    from flexunet.io.serialization import load, save

    model = _load_folder(args.model_dir).eval()
    stride = model.maximum_stride
    side = max(64, stride)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, model.in_channels, side, side, generator=generator)
    with torch.inference_mode():
        expected = _as_dict(model(x))

    if args.out.lower().endswith(".onnx"):
        import onnxruntime

        export_onnx(model, args.out, x)
        session = onnxruntime.InferenceSession(args.out, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()})))
        got = {k: torch.from_numpy(v) for k, v in got.items()}
        kind = "ONNX"
    else:
        save(model, args.out)
        with torch.inference_mode():
            got = _as_dict(load(args.out)(x))
        kind = "flexunet"
    if list(got) != list(expected):
        raise ValueError(f"converted outputs {list(got)} differ from the source's {list(expected)}.")
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    print(f"wrote {kind} model to {args.out}")
    print(f"verified on a random {tuple(x.shape)} input: largest difference {worst:.3g} "
          f"over outputs {', '.join(expected)}")


def _convert_keypoints(args: argparse.Namespace) -> None:
    import numpy as np

    from flexunet.predict.export import export_keypoints_onnx, load_onnx_predictor
    from flexunet.predict.predictor import load_predictor

    if not args.out.lower().endswith(".onnx"):
        raise ValueError(f"--keypoints writes an ONNX file: OUT must end in .onnx, got {args.out!r}.")
    if args.frame_shape is None:
        raise ValueError("--keypoints needs --frame-shape H W C (the graph is built for one frame size).")
    folders = [args.model_dir] + ([args.second_model] if args.second_model else [])
    predictor = load_predictor(folders, max_instances=args.max_instances)
    export_keypoints_onnx(predictor, args.out, args.frame_shape, max_instances=args.max_instances)
    frames = np.random.default_rng(0).integers(0, 256, (2, *args.frame_shape), dtype=np.uint8)
    expected, got = predictor(frames), load_onnx_predictor(args.out)(frames)
    same = np.array_equal(expected.instance_counts, got.instance_counts) and np.allclose(
        expected.points, got.points, atol=1e-3, equal_nan=True)
    if not same:
        raise ValueError(f"the exported graph disagrees with the PyTorch predictor on random frames; {args.out} "
                         "was written but should not be used.")
    print(f"wrote ONNX keypoint model ({predictor.model_type}) to {args.out}")
    print(f"verified on random {tuple(frames.shape)} frames: {int(got.instance_counts.sum())} instances, "
          "same as the PyTorch predictor")


def _predict(args: argparse.Namespace) -> None:
    import time

    from flexunet.predict.predictor import load_predictor
    from flexunet.predict.video import open_video, parse_frames, predict_video, save_slp

    if not args.out.lower().endswith(".slp"):
        raise ValueError(f"-o/--output must name a .slp file, got {args.out!r}.")
    video = open_video(args.video)
    frames = parse_frames(args.frames, int(video.shape[0]))
    threshold = args.peak_threshold[0] if len(args.peak_threshold) == 1 else tuple(args.peak_threshold)
    predictor = load_predictor(args.model, peak_threshold=threshold, max_instances=args.max_instances,
                               integral_refinement=None if args.integral_refinement == "none" else "integral",
                               batch_size=args.batch_size, bf16=args.bf16)
    progress = not args.no_progress and sys.stderr.isatty() and len(frames) > args.batch_size
    start = time.perf_counter()
    predictions = predict_video(predictor, video, frames, progress=progress)
    seconds = time.perf_counter() - start
    from flexunet import __version__

    save_slp(predictions, video, args.out, provenance={
        "flexunet_version": __version__, "model_paths": [os.path.abspath(m) for m in args.model],
        "model_type": predictor.model_type, "frames": len(frames), "batch_size": args.batch_size,
        "bf16": args.bf16, "inference_runtime_seconds": seconds})
    print(f"wrote {int(predictions.instance_counts.sum())} instances in {len(frames)} frames to {args.out} "
          f"({len(frames) / seconds:.1f} frames/s, {predictor.model_type})")


def _kernels(args: argparse.Namespace) -> None:
    import torch

    from flexunet.kernels import choice, native

    if args.clear:
        choice.clear()
        print("flexunet: the measured kernel choices of this machine are forgotten.")
        return
    print(f"mode: {native.mode()} (FLEXUNET_NATIVE={os.environ.get('FLEXUNET_NATIVE', '') or 'unset'}); "
          f"{torch.get_num_threads()} threads; choices file: {choice._file() or 'none (no private cache)'}")
    if args.measure:
        if args.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {args.batch}.")
        from flexunet.summary import summarize

        model = _model_for_summary(args.config, args.input_shape).eval()
        h, w, c = summarize(model, input_shape=tuple(args.input_shape) if args.input_shape else None).input_shape
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            model(torch.rand(args.batch, c, h, w))
    table = choice.choices()
    if not table:
        print("nothing measured yet: run a model (or `flexunet kernels --measure`) first.")
        return
    width = max(len(key) for key in table)
    print(f"{'layer':{width}}  {'chosen':12}  milliseconds per candidate")
    for key, entry in sorted(table.items()):
        times = ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(entry["ms"].items(), key=lambda kv: kv[1]))
        print(f"{key:{width}}  {entry['choice']:12}  {times}")
    counts: dict[str, dict[str, int]] = {}
    for key, entry in table.items():
        kind = counts.setdefault(key.split("|")[0], {})
        kind[entry["choice"]] = kind.get(entry["choice"], 0) + 1
    print("chosen: " + "; ".join(f"{kind}: " + ", ".join(f"{name} {n}" for name, n in sorted(names.items()))
                                 for kind, names in sorted(counts.items())))


def _as_dict(output) -> dict:
    return output if isinstance(output, dict) else {"output": output}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `flexunet` command."""
    parser = argparse.ArgumentParser(
        prog="flexunet",
        description="SLEAP's generalized UNet in PyTorch: inspect, convert and export models, predict poses.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "summary", help="per-layer table, parameters, strides, receptive field, FLOPs and memory",
        description="Print a model's layers (SLEAP layer names), parameter count, strides, receptive "
        "field, FLOPs and memory. Without --config: the default UNet (34,512,128 parameters).",
    )
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a model folder (SLEAP, sleap-nn or flexunet), or a config file: UNet parameters or a "
                   "UNetConfig (JSON), a SLEAP training_config.json, a sleap-nn training_config.yaml or a "
                   "flexunet config.json (default: the default UNet)")
    p.add_argument("--input-shape", nargs=3, type=int, metavar=("H", "W", "C"), default=None,
                   help="input height, width and channels (default: 192 192 and the model's channels)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors (default: off)")
    p.set_defaults(func=_summary)

    p = sub.add_parser(
        "convert", help="convert a SLEAP model folder (or flexunet directory) and verify it",
        description="Convert MODEL_DIR (a SLEAP folder with training_config.json and best_model.h5, a "
        "sleap-nn folder with training_config.yaml and best.ckpt, or a flexunet directory) to OUT: a "
        "directory (flexunet.save format) or a .onnx file. "
        "The result is run on a random input and compared with the source.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="SLEAP or sleap-nn model folder, or flexunet model directory")
    p.add_argument("out", metavar="OUT", help="output directory, or a file ending in .onnx")
    p.add_argument("--keypoints", action="store_true",
                   help="export the decoding too: uint8 frames in, keypoints and scores out (ONNX only; "
                   "default: the network's raw outputs)")
    p.add_argument("--with", dest="second_model", metavar="MODEL_DIR2", default=None,
                   help="with --keypoints: the centered-instance model of a top-down pair (default: none)")
    p.add_argument("--frame-shape", nargs=3, type=int, metavar=("H", "W", "C"), default=None,
                   help="with --keypoints: the frames' height, width and channels (required there)")
    p.add_argument("--max-instances", type=int, default=None,
                   help="with --keypoints: instance slots per frame (required for centroid and top-down models)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors (default: off)")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "predict", help="predict poses in a video with SLEAP models and write a .slp file",
        description="Run one SLEAP model folder (single instance, centroid, bottom-up, multi-class bottom-up) or "
        "two (centroid + centered instance or multi-class top-down), Keras or sleap-nn, on a video and "
        "write the poses as a SLEAP .slp file (sleap-io), decoded as sleap-nn decodes them.",
    )
    p.add_argument("video", metavar="VIDEO", help="a video sleap-io can read (mp4, avi, ...)")
    p.add_argument("-m", "--model", action="append", required=True, metavar="MODEL",
                   help="a model folder; give two for top-down (centroid + centered instance)")
    p.add_argument("-o", "--output", dest="out", required=True, metavar="OUT.slp", help="the .slp file to write")
    p.add_argument("--frames", default=None, metavar="RANGE",
                   help="frames to predict: 0-7, 12 or 0,5,10-20, inclusive (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="frames per network call (default: 4)")
    p.add_argument("--peak-threshold", type=float, nargs="+", default=[0.2], metavar="T",
                   help="minimum peak confidence; two values set the centroid and instance stages apart "
                   "(default: 0.2)")
    p.add_argument("--max-instances", type=int, default=None, help="at most this many instances per frame "
                   "(default: no limit)")
    p.add_argument("--integral-refinement", choices=("integral", "none"), default="integral",
                   help="sub-pixel peak refinement (default: integral)")
    p.add_argument("--bf16", action="store_true", help="run the networks in bfloat16 (default: float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors (default: off)")
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "kernels", help="the kernels this machine measured fastest, per layer shape",
        description="List the implementation chosen for every layer shape measured on this machine (native "
        "kernels, oneDNN, Winograd as batched products, ATen), with each candidate's time. Choices are "
        "measured at the first call of each shape and kept in the private kernel cache.",
    )
    p.add_argument("--measure", action="store_true",
                   help="first run a model once, so its layers are measured (default: list what is recorded)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="with --measure: the model, as for `flexunet summary` (default: the default UNet)")
    p.add_argument("--input-shape", nargs=3, type=int, metavar=("H", "W", "C"), default=None,
                   help="with --measure: input height, width and channels (default: 192 192 and the model's)")
    p.add_argument("--batch", type=int, default=1, help="with --measure: images per call (default: 1)")
    p.add_argument("--bf16", action="store_true", help="with --measure: under bfloat16 autocast (default: float32)")
    p.add_argument("--clear", action="store_true", help="forget every recorded choice (default: keep them)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors (default: off)")
    p.set_defaults(func=_kernels)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `flexunet` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # every failure becomes one line unless --debug
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"flexunet {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
