"""Exported models that output keypoints: the ONNX graph in onnxruntime against the PyTorch predictor
and sleap-nn's reference keypoints, on every shared job."""

import numpy as np
import pytest

from tests.test_predict import JOBS, POINT_TOLERANCE, SCORE_TOLERANCE, compare, job, predictor_for

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", JOBS)
def test_exported_keypoints_match_the_predictor_and_sleap_nn(name, tmp_path):
    from flexunet.predict.export import export_keypoints_onnx, load_onnx_predictor

    meta, ref = job(name)
    predictor = predictor_for(name)
    path = export_keypoints_onnx(predictor, tmp_path / f"{name}.onnx", ref["images"].shape[1:],
                                 max_instances=max(meta["instances_per_frame"]) + 2)
    exported = load_onnx_predictor(path)
    ours, theirs = predictor(ref["images"]), exported(ref["images"])
    assert exported.model_type == predictor.model_type
    np.testing.assert_array_equal(ours.instance_counts, theirs.instance_counts)
    worst = compare(ref, theirs.points, theirs.point_scores, theirs.instance_scores, theirs.tracks)
    assert worst["points"] <= POINT_TOLERANCE and worst["scores"] <= SCORE_TOLERANCE, worst
    np.testing.assert_allclose(theirs.points, ours.points, atol=1e-3)  # same order as the predictor, too
    np.testing.assert_allclose(theirs.instance_scores, ours.instance_scores, atol=1e-4)


def test_export_refuses_what_it_cannot_build(tmp_path):
    from flexunet.predict.export import export_keypoints_onnx, load_onnx_predictor

    _, ref = job("topdown")
    with pytest.raises(ValueError, match="needs max_instances"):
        export_keypoints_onnx(predictor_for("topdown"), tmp_path / "x.onnx", ref["images"].shape[1:])
    with pytest.raises(ValueError, match="frame_shape"):
        export_keypoints_onnx(predictor_for("bottomup"), tmp_path / "x.onnx", (384, 384))
    with pytest.raises(FileNotFoundError, match="x.onnx"):
        load_onnx_predictor(tmp_path / "x.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="junk.onnx"):
        load_onnx_predictor(tmp_path / "junk.onnx")


def test_exported_graph_takes_only_its_frame_size(tmp_path):
    from flexunet.predict.export import export_keypoints_onnx, load_onnx_predictor

    _, ref = job("single_instance")
    path = export_keypoints_onnx(predictor_for("single_instance"), tmp_path / "s.onnx", ref["images"].shape[1:])
    with pytest.raises(ValueError, match=r"frames of shape \(N, 384, 384, 1\)"):
        load_onnx_predictor(path)(np.zeros((1, 200, 200, 1), np.uint8))


def test_cli_convert_keypoints_writes_a_verified_graph(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REFERENCE

    out = tmp_path / "topdown.onnx"
    nn = REFERENCE / "sleapnn_models"
    run = subprocess.run([sys.executable, "-m", "flexunet", "convert", str(nn / "minimal_instance_centroid"), str(out),
                          "--keypoints", "--with", str(nn / "minimal_instance_centered_instance"),
                          "--frame-shape", "384", "384", "1", "--max-instances", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "same as the PyTorch predictor" in run.stdout and out.is_file()
