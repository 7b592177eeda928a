"""Videos in, `.slp` out, with sleap-io; frames are decoded in a background thread while the
networks run on the batch before.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from flexunet.predict.predictions import Predictions
from flexunet.predict.predictor import Predictor
from flexunet.predict.preprocess import as_frames


def _sleap_io():
    try:
        import sleap_io
    except ImportError:
        raise ImportError("reading videos and writing .slp files needs sleap-io: "
                          "pip install \"flexunet[predict]\"") from None
    return sleap_io


def open_video(path: str | os.PathLike):
    """A `sleap_io.Video` for `path`; FileNotFoundError or ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    sio = _sleap_io()
    try:
        video = sio.load_video(path)
        shape = video.shape
    except Exception as err:  # any decoder failure: the file is not a readable video
        raise ValueError(f"{path} could not be opened as a video: {err}") from None
    if shape is None or len(shape) != 4 or shape[0] < 1:
        raise ValueError(f"{path} could not be opened as a video: it reports no frames (shape {shape}).")
    return video


def parse_frames(spec: Optional[str], n_frames: int, source: str = "--frames") -> list[int]:
    """Frame indices from "0-7", "3", "0,5,10-12" (inclusive ranges); all frames for None."""
    if spec is None:
        return list(range(n_frames))
    frames: list[int] = []
    for part in str(spec).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"{source} must be frame numbers or ranges like 0-7 or 0,5,10-12; got {spec!r}.")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise ValueError(f"{source}: the range {part.strip()} ends before it starts.")
        frames.extend(range(start, stop + 1))
    return check_frames(frames, n_frames, source)


def check_frames(frames: Sequence[int], n_frames: int, source: str = "frames") -> list[int]:
    """`frames` as ints, each inside a video of `n_frames` frames."""
    frames = [int(f) for f in frames]
    outside = [f for f in frames if not 0 <= f < n_frames]
    if outside:
        raise ValueError(f"{source} asks for frame {outside[0]}, but the video has {n_frames} frames "
                         f"(0-{n_frames - 1}).")
    if not frames:
        raise ValueError(f"{source} selects no frames.")
    return frames


def frame_batches(video, frames: Sequence[int], batch_size: int, prefetch: int = 2
                  ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """uint8 (n, C, H, W) batches of `frames` of `video`, decoded ahead in a background thread.

    Raises:
        ValueError: a frame could not be decoded (naming it and how far decoding got).
    """
    batches: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    path = getattr(video, "filename", "video")

    def put(item) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def decode():
        done = 0
        try:
            for start in range(0, len(frames), batch_size):
                index = np.asarray(frames[start:start + batch_size])
                images = []
                for f in index:
                    try:
                        image = video[int(f)]
                    except Exception as err:  # a decoder error: report the frame it reached
                        raise ValueError(f"{path}: frame {int(f)} could not be decoded ({err}); "
                                         f"{done} frames were read before it.") from None
                    if image is None:
                        raise ValueError(f"{path}: frame {int(f)} could not be decoded (the video may be "
                                         f"truncated); {done} frames were read before it.")
                    images.append(np.asarray(image))
                    done += 1
                if not put((as_frames(np.stack(images), name=f"{path} frames"), index)):
                    return
            put(None)
        except BaseException as err:  # handed to the consumer
            put(err)

    thread = threading.Thread(target=decode, name="flexunet-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = batches.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def predict_video(predictor: Predictor, video, frames: Optional[Sequence[int]] = None,
                  progress: bool = False) -> Predictions:
    """Poses in frames of a video (a path or a `sleap_io.Video`); all frames by default.

    Args:
        predictor: From `flexunet.sleap.load_predictor`.
        video: Path to a video sleap-io can read, or a `sleap_io.Video`.
        frames: Frame indices (default: every frame).
        progress: Show a progress bar (tqdm).
    """
    if isinstance(video, (str, os.PathLike)):
        video = open_video(video)
    n_frames = int(video.shape[0])
    frames = list(range(n_frames)) if frames is None else check_frames(frames, n_frames)
    batches = frame_batches(video, frames, predictor.options.batch_size)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(frames), unit="frame", desc="predicting")

        def counted():
            for images, index in batches:
                yield images, index
                bar.update(len(index))

        try:
            return predictor.predict_batches(counted())
        finally:
            bar.close()
    return predictor.predict_batches(batches)


def save_slp(predictions: Predictions, video, path: str | os.PathLike, provenance: Optional[dict] = None) -> str:
    """Write `predictions` of frames of `video` (a path or `sleap_io.Video`) as a SLEAP `.slp` file."""
    sio = _sleap_io()
    if isinstance(video, (str, os.PathLike)):
        video = open_video(video)
    labels = predictions.to_labels(video=video)
    if provenance:
        labels.provenance.update(provenance)
    path = os.fspath(path)
    sio.save_slp(labels, path)
    return path


__all__ = ["check_frames", "frame_batches", "open_video", "parse_frames", "predict_video", "save_slp"]
