"""Keypoints as sleap-nn predicts them: every shared reference job, the CLI through sleap-io, bad inputs."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from flexunet.predict.predictor import load_predictor
from tests.conftest import REFERENCE, require_reference

PREDICTIONS = REFERENCE / "predictions"
JOBS = ["single_instance", "centroid", "topdown", "bottomup", "multiclass_bottomup", "keras_single_instance_robot",
        "keras_multiclass_bottomup"]
POINT_TOLERANCE, SCORE_TOLERANCE = 0.01, 1e-3  # the references' own tolerances


def job(name: str) -> tuple[dict, dict]:
    require_reference()
    meta = json.loads((PREDICTIONS / name / "job.json").read_text())
    return meta, dict(np.load(PREDICTIONS / name / "predictions.npz"))


@functools.lru_cache(maxsize=None)
def predictor_for(name: str):
    meta, _ = job(name)
    return load_predictor([str(REFERENCE / m) for m in meta["models"]], **meta["options"])


def matched(ref_points: np.ndarray, our_points: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (reference instance, ours) matched by mean point distance (instances are compared as sets)."""
    cost = np.zeros((len(ref_points), len(our_points)))
    for i, a in enumerate(ref_points):
        for j, b in enumerate(our_points):
            d = np.abs(a - b)
            cost[i, j] = np.nanmean(d) if not np.isnan(d).all() else 1e9
    rows, cols = linear_sum_assignment(cost)
    return list(zip(rows, cols))


def compare(ref: dict, points, point_scores, instance_scores, tracks) -> dict:
    """Worst differences between reference arrays and ours; fails on a count, NaN or track mismatch."""
    worst = {"points": 0.0, "scores": 0.0, "instances": 0}
    for f in range(len(ref["frames"])):
        ref_valid = ~np.isnan(ref["instance_scores"][f])
        our_valid = ~np.isnan(instance_scores[f])
        assert ref_valid.sum() == our_valid.sum(), f"frame {f}: {our_valid.sum()} instances, sleap-nn {ref_valid.sum()}"
        rp, op = ref["points"][f][ref_valid], points[f][our_valid]
        for i, j in matched(rp, op):
            assert np.array_equal(np.isnan(rp[i]), np.isnan(op[j])), f"frame {f}: missing nodes differ"
            if not np.isnan(rp[i]).all():
                worst["points"] = max(worst["points"], float(np.nanmax(np.abs(rp[i] - op[j]))))
            score_diff = np.abs(ref["point_scores"][f][ref_valid][i] - point_scores[f][our_valid][j])
            worst["scores"] = max(worst["scores"], float(np.nanmax(score_diff)) if not np.isnan(score_diff).all()
                                  else 0.0, abs(float(ref["instance_scores"][f][ref_valid][i]
                                                      - instance_scores[f][our_valid][j])))
            assert ref["tracks"][f][ref_valid][i] == tracks[f][our_valid][j], f"frame {f}: track differs"
            worst["instances"] += 1
    return worst


@pytest.mark.parametrize("name", JOBS)
def test_reference_job_matches_sleap_nn(name):
    """The same instances per frame as sleap-nn's `predict`, points within 0.01 px, scores within 1e-3."""
    meta, ref = job(name)
    out = predictor_for(name)(ref["images"], frame_indices=ref["frames"])
    assert list(out.node_names) == [str(n) for n in ref["node_names"]]
    assert out.frame_indices.tolist() == ref["frames"].tolist()
    worst = compare(ref, out.points, out.point_scores, out.instance_scores, out.tracks)
    assert worst["instances"] == sum(meta["instances_per_frame"])
    assert worst["points"] <= POINT_TOLERANCE, worst
    assert worst["scores"] <= SCORE_TOLERANCE, worst


def test_every_shared_job_is_listed():
    """New reference jobs must not pass unnoticed."""
    require_reference()
    assert sorted(p.name for p in PREDICTIONS.iterdir() if (p / "job.json").is_file()) == sorted(JOBS)


@pytest.mark.parametrize("name", ["topdown", "keras_multiclass_bottomup"])
def test_cli_predict_writes_slp_that_sleap_io_reads_back(name, tmp_path):
    """`flexunet predict` on the job's video: the .slp read back with sleap-io matches sleap-nn's .slp."""
    sio = pytest.importorskip("sleap_io")
    meta, ref = job(name)
    out = tmp_path / "out.slp"
    frames = f"{min(meta['frames'])}-{max(meta['frames'])}"
    args = [str(PREDICTIONS / meta["video"]), "-o", str(out), "--frames", frames, "--no-progress"]
    for m in meta["models"]:
        args += ["-m", str(REFERENCE / m)]
    run = subprocess.run([sys.executable, "-m", "flexunet", "predict", *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    ours, theirs = sio.load_slp(str(out)), sio.load_slp(str(PREDICTIONS / name / "predictions.slp"))
    assert [lf.frame_idx for lf in ours] == [lf.frame_idx for lf in theirs]
    assert [n.name for n in ours.skeleton.nodes] == [n.name for n in theirs.skeleton.nodes]
    assert ours.skeleton.edge_inds == theirs.skeleton.edge_inds

    def arrays(labels):
        width = max(len(lf.instances) for lf in labels)
        n, k = len(labels), len(labels.skeleton.nodes)
        pts, pscores = np.full((n, width, k, 2), np.nan), np.full((n, width, k), np.nan)
        iscores, tracks = np.full((n, width), np.nan), np.full((n, width), "", dtype=object)
        for f, lf in enumerate(labels):
            for i, inst in enumerate(lf.instances):
                data = inst.numpy(scores=True)
                pts[f, i], pscores[f, i], iscores[f, i] = data[:, :2], data[:, 2], inst.score
                tracks[f, i] = inst.track.name if inst.track is not None else ""
        return pts, pscores, iscores, tracks

    ref_pts, ref_scores, ref_instance_scores, ref_tracks = arrays(theirs)
    reference = {"frames": np.arange(len(theirs)), "points": ref_pts, "point_scores": ref_scores,
                 "instance_scores": ref_instance_scores, "tracks": ref_tracks}
    worst = compare(reference, *arrays(ours))
    assert worst["points"] <= POINT_TOLERANCE and worst["scores"] <= SCORE_TOLERANCE, worst
    assert "flexunet_version" in ours.provenance


def sleap_nn_crop(frame: np.ndarray, center: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """A crop cut by sleap-nn's rule, written out: the corner `center - size / 2 + 0.5` (float32), the
    pixel grid from `trunc(corner + size // 2) - size // 2`, zeros outside the frame; and the corner."""
    corner = center.astype(np.float32) - np.float32(size / 2) + np.float32(0.5)
    x0, y0 = (np.trunc(corner + np.float32(size // 2)) - size // 2).astype(int)
    padded = np.pad(frame[..., 0], size)
    window = padded[y0 + size:y0 + 2 * size, x0 + size:x0 + 2 * size]
    return torch.from_numpy(window.astype(np.float32))[None, None] / 255.0, corner


def refined_maxima(maps: np.ndarray, patch: int = 5) -> np.ndarray:
    """(K, 2) x/y of each map's maximum moved by the centre of mass of the patch around it (zeros outside)."""
    k, h, w = maps.shape
    half = patch // 2
    grid = np.arange(patch) - half
    points = []
    for m in maps:
        y, x = np.unravel_index(np.argmax(m), m.shape)
        window = np.pad(m, half)[y:y + patch, x:x + patch]
        points.append([x + (window.sum(0) * grid).sum() / window.sum(), y + (window.sum(1) * grid).sum() / window.sum()])
    return np.array(points)


def test_multi_class_top_down_follows_sleap_nns_rules():
    """The public multi-class top-down pair. At the default threshold: no instances (as sleap-nn 0.3.5
    returns). At threshold 0: one instance per centroid of the centroid job, with the centroid's score,
    points at the integral-refined global maxima of the second model's maps on sleap-nn's crops, and the
    crops of a frame taking distinct classes."""
    _, ref = job("topdown")
    _, centroids = job("centroid")  # the same centroid model on the same frames
    folders = [str(REFERENCE / "sleapnn_models" / "minimal_instance_centroid"),
               str(REFERENCE / "sleapnn_models" / "minimal_instance_multiclass_centered_instance")]
    images = ref["images"][:4]
    assert load_predictor(folders)(images).instance_counts.tolist() == [0, 0, 0, 0]
    predictor = load_predictor(folders[::-1], keypoint_threshold=0.0)
    assert predictor.model_type == "multi_class_topdown" and predictor.classes == ("female", "male")
    out = predictor(images)
    model, size = predictor.stages[1].model, predictor.crop_size
    for f in range(4):
        valid = ~np.isnan(centroids["instance_scores"][f])
        assert out.instance_counts[f] == valid.sum()
        assert sorted(out.identities[f][: valid.sum()].tolist()) == [0, 1]
        for center, score in zip(centroids["points"][f][valid][:, 0], centroids["instance_scores"][f][valid]):
            window, corner = sleap_nn_crop(images[f], center, size)
            with torch.inference_mode():
                maps = model(window)["CenteredInstanceConfmapsHead"][0]
            expected = refined_maxima(maps.numpy()) * (size // maps.shape[-1]) + corner
            j = int(np.argmin(np.abs(out.instance_scores[f] - score)))
            assert abs(out.instance_scores[f, j] - score) <= SCORE_TOLERANCE
            np.testing.assert_allclose(out.points[f, j], expected, atol=POINT_TOLERANCE)


# ------------------------------------------------------------- bad inputs


def test_rgb_frames_for_a_grayscale_model_are_converted():
    """RGB frames with three equal channels give the grayscale frames' poses (luma of equal channels)."""
    _, ref = job("topdown")
    predictor = predictor_for("topdown")
    gray = ref["images"][:2]
    rgb = np.repeat(gray, 3, axis=-1)
    a, b = predictor(gray), predictor(rgb)
    np.testing.assert_allclose(a.points, b.points, atol=POINT_TOLERANCE)  # luma weights sum to 0.9999


def test_frames_without_peaks_give_no_instances():
    for name in ("topdown", "bottomup", "single_instance", "multiclass_bottomup", "centroid"):
        _, ref = job(name)
        out = predictor_for(name)(np.zeros_like(ref["images"][:2]))
        assert out.instance_counts.tolist() == [0, 0], name
        assert out.points.shape[:2] == (2, 0)


def test_nan_in_the_maps_names_the_frame():
    _, ref = job("bottomup")
    predictor = load_predictor(str(REFERENCE / "sleapnn_models" / "minimal_instance_bottomup"))
    model = predictor.stages[0].model

    def poison(module, args, output):
        output = dict(output)
        maps = output["MultiInstanceConfmapsHead"].clone()
        maps[1, 0, 5, 5] = float("nan")
        output["MultiInstanceConfmapsHead"] = maps
        return output

    model.register_forward_hook(poison)
    with pytest.raises(ValueError, match=r"NaN or infinite values for frame 11"):
        predictor(ref["images"][:2], frame_indices=[10, 11])


@pytest.mark.parametrize("frames, error, match", [
    (np.zeros((2, 64, 64, 1), np.float32), TypeError, "uint8"),
    (np.zeros((2, 64, 64, 2), np.uint8), ValueError, "1 or 3 channels"),
    (np.zeros((64, 64), np.uint8), ValueError, r"\(N, H, W, C\)"),
    ([1, 2, 3], TypeError, "NumPy array or torch tensor"),
])
def test_bad_frames_are_refused_with_a_sentence(frames, error, match):
    with pytest.raises(error, match=match):
        predictor_for("centroid")(frames)


def test_models_that_do_not_pair_are_refused():
    require_reference()
    nn = REFERENCE / "sleapnn_models"
    centroid, centered = str(nn / "minimal_instance_centroid"), str(nn / "minimal_instance_centered_instance")
    with pytest.raises(ValueError, match="do not pair"):
        load_predictor([centroid, str(nn / "v035_centroid_unet")])
    with pytest.raises(ValueError, match="pass a centroid model folder too"):
        load_predictor(centered)
    with pytest.raises(ValueError, match="do not pair"):
        load_predictor([centered, str(nn / "minimal_instance_bottomup")])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_predictor(str(nn / "no_such_model"))


@pytest.mark.parametrize("options, match", [
    ({"peak_threshold": "high"}, "peak_threshold"),
    ({"integral_refinement": "quadratic"}, "integral_refinement"),
    ({"max_instances": 0}, "max_instances"),
    ({"batch_size": 0}, "batch_size"),
    ({"integral_patch_size": 0}, "integral_patch_size"),
    ({"n_points": 1}, "n_points"),
])
def test_bad_options_are_refused_with_a_sentence(options, match):
    require_reference()
    with pytest.raises((ValueError, TypeError), match=match):
        load_predictor(str(REFERENCE / "sleapnn_models" / "minimal_instance_bottomup"), **options)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "flexunet", "predict", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_errors_name_the_file_or_option(tmp_path):
    pytest.importorskip("sleap_io")
    require_reference()
    video = PREDICTIONS / "centered_pair_small.mp4"
    model = REFERENCE / "sleapnn_models" / "minimal_instance_centroid"
    cases = [
        ((tmp_path / "missing.mp4", "-m", model, "-o", tmp_path / "o.slp"), "video not found"),
        ((video, "-m", model, "-o", tmp_path / "o.slp", "--frames", "1090-1200"), "has 1100 frames"),
        ((video, "-m", model, "-o", tmp_path / "o.slp", "--frames", "seven"), "--frames must be"),
        ((video, "-m", model, "-m", model, "-o", tmp_path / "o.slp", "--frames", "0"), "do not pair"),
        ((video, "-m", model, "-o", tmp_path / "o.txt"), "must name a .slp file"),
    ]
    (tmp_path / "not_a_video.mp4").write_text("hello")
    cases.append(((tmp_path / "not_a_video.mp4", "-m", model, "-o", tmp_path / "o.slp"), "not_a_video.mp4"))
    for args, message in cases:
        run = cli(*args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr


def test_truncated_video_reports_the_frame_reached(tmp_path):
    pytest.importorskip("sleap_io")
    from flexunet.predict.video import open_video, predict_video

    require_reference()
    source = PREDICTIONS / "centered_pair_small.mp4"
    truncated = tmp_path / "truncated.mp4"
    data = source.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    try:
        video = open_video(truncated)
    except ValueError as err:  # the container index may already be unreadable
        assert "truncated.mp4" in str(err)
        return
    with pytest.raises(ValueError, match=r"frame \d+ could not be decoded.*\d+ frames were read"):
        predict_video(predictor_for("centroid"), video, frames=range(int(video.shape[0])))


def test_predictions_to_labels_keeps_tracks_and_scores():
    sio = pytest.importorskip("sleap_io")
    _, ref = job("multiclass_bottomup")
    out = predictor_for("multiclass_bottomup")(ref["images"][:2])
    labels = out.to_labels()
    assert isinstance(labels, sio.Labels) and len(labels) == 2
    assert [t.name for t in labels.tracks] == ["female", "male"]
    first = labels[0].instances[0]
    np.testing.assert_allclose(first.numpy(), out.points[0, 0], atol=1e-6)
    assert first.score == pytest.approx(float(out.instance_scores[0, 0]))
    assert first.track.name == out.tracks[0, 0]


def test_bf16_predictions_stay_close():
    _, ref = job("topdown")
    folders = [str(REFERENCE / m) for m in json.loads((PREDICTIONS / "topdown" / "job.json").read_text())["models"]]
    out = load_predictor(folders, bf16=True)(ref["images"][:4])
    worst = compare({k: v[:4] for k, v in ref.items() if k != "node_names"}, out.points, out.point_scores,
                    out.instance_scores, out.tracks)
    assert worst["points"] < 1.0, worst
