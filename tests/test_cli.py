"""The `flexunet` command: summary and convert, errors as one line with exit status 2."""

import json
import subprocess
import sys

import pytest

from flexunet.cli import main
from tests.conftest import SLEAP_MODELS


def run(*args):
    return subprocess.run([sys.executable, "-m", "flexunet", *args], capture_output=True, text=True)


def test_summary_of_the_default_unet_runs_as_a_module():
    result = run("summary")
    assert result.returncode == 0, result.stderr
    assert "total parameters: 34,512,128" in result.stdout
    assert "encoder stride: 16" in result.stdout and "output stride: 1" in result.stdout
    assert "receptive field: 220 px" in result.stdout
    assert "stack0_enc5_middle_expand_conv0" in result.stdout


@pytest.mark.parametrize("content,expected", [
    ({"filters": 8, "down_blocks": 2, "up_blocks": 2, "middle_block": False}, "total parameters: 16,320"),
    ({"max_stride": 16, "output_stride": 4, "filters": 8}, "output stride: 4"),
])
def test_summary_of_config_files(tmp_path, capsys, content, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    assert main(["summary", "--config", str(path), "--input-shape", "64", "96", "1"]) == 0
    out = capsys.readouterr().out
    assert expected in out and "input: 64x96x1" in out


def test_summary_of_a_sleap_training_config_shows_heads(reference, capsys):
    config = SLEAP_MODELS / "minimal_instance.UNet.bottomup" / "training_config.json"
    assert main(["summary", "--config", str(config), "--input-shape", "96", "96", "1"]) == 0
    out = capsys.readouterr().out
    assert "PartAffinityFieldsHead_0" in out and "24x24x2" in out and "OffsetRefinementHead_0" in out
    assert "output stride: 2" in out


@pytest.mark.parametrize("content,args,message", [
    ('{"filter": 8}', [], "unknown key 'filter' in UNet parameters; did you mean 'filters'?"),
    ('{"filters": 8', [], "is not valid JSON"),
    ('{"max_stride": 12}', [], "max_stride must be a power of two"),
    ('{"filters": 8}', ["--input-shape", "100", "96", "1"], "multiples of the maximum stride 16"),
    (None, [], "config file not found"),
])
def test_bad_configs_exit_2_with_one_line(tmp_path, content, args, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    result = run("summary", "--config", str(path), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"filter": 8}')
    result = run("--debug", "summary", "--config", str(path))
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("command", [[], ["summary"], ["convert"], ["kernels"]])
def test_help_documents_every_option_with_defaults(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    for option in {"": ["--debug"], "summary": ["--config", "--input-shape", "default"],
                   "convert": ["MODEL_DIR", "OUT"], "kernels": ["--measure", "--clear", "--bf16", "default"]
                   }[command[0] if command else ""]:
        assert option in result.stdout


@pytest.mark.parametrize("make_source,message", [
    (lambda tmp: tmp / "missing", "model not found"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no model flexunet reads"),
])
def test_convert_errors_exit_2_with_one_line(tmp_path, make_source, message):
    result = run("convert", str(make_source(tmp_path)), str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_convert_sleap_folder_to_native_and_onnx(reference, tmp_path):
    source = SLEAP_MODELS / "minimal_instance.UNet.centroid"
    for out in (tmp_path / "native", tmp_path / "model.onnx"):
        result = run("convert", str(source), str(out))
        assert result.returncode == 0, result.stderr
        assert "largest difference" in result.stdout
        difference = float(result.stdout.split("largest difference ")[1].split()[0])
        assert difference <= 1e-4


SLEAP_NN = SLEAP_MODELS.parent / "sleapnn_models"


@pytest.mark.parametrize("target", ["minimal_instance_bottomup", "minimal_instance_bottomup/training_config.yaml"])
def test_summary_of_a_sleap_nn_folder_or_its_yaml(reference, capsys, target):
    assert main(["summary", "--config", str(SLEAP_NN / target), "--input-shape", "96", "96", "1"]) == 0
    out = capsys.readouterr().out
    assert "PartAffinityFieldsHead" in out and "24x24x2" in out and "MultiInstanceConfmapsHead" in out
    assert "output stride: 2" in out and "total parameters: 150,648" in out  # sleap-nn's own total_params


def test_summary_of_a_lone_sleap_nn_yaml(reference, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text((SLEAP_NN / "v035_centroid_unet" / "training_config.yaml").read_text())
    assert main(["summary", "--config", str(config)]) == 0
    assert "total parameters: 1,953,105" in capsys.readouterr().out  # sleap-nn's own total_params


@pytest.mark.parametrize("name", ["minimal_instance_centroid", "minimal_instance_multiclass_centered_instance"])
def test_convert_sleap_nn_folder_to_native_and_onnx(reference, tmp_path, name):
    for out in (tmp_path / "native", tmp_path / "model.onnx"):
        result = run("convert", str(SLEAP_NN / name), str(out))
        assert result.returncode == 0, result.stderr
        difference = float(result.stdout.split("largest difference ")[1].split()[0])
        assert difference <= 1e-4


def test_kernels_measures_a_model_and_lists_every_choice(private_dir, monkeypatch, capsys):
    from flexunet.kernels import choice, native

    monkeypatch.setenv("FLEXUNET_CACHE_DIR", str(private_dir))
    monkeypatch.delenv("FLEXUNET_NATIVE", raising=False)  # measured, not forced
    choice.CHOICES._table = None
    try:
        assert main(["kernels"]) == 0
        assert "nothing measured yet" in capsys.readouterr().out
        config = private_dir / "unet.json"
        config.write_text('{"filters": 8, "down_blocks": 2, "up_blocks": 2}')
        assert main(["kernels", "--measure", "--config", str(config), "--input-shape", "32", "32", "1"]) == 0
        out = capsys.readouterr().out
        if native.mode() == "measure":
            assert "conv3x3|float32|1x8x32x32|skip0|none|8|relu" in out and "choices file: " + str(private_dir) in out
            assert "chosen: " in out and "conv3x3: " in out
        assert main(["kernels", "--measure", "--batch", "0"]) == 2
        assert "--batch must be at least 1, got 0" in capsys.readouterr().err
        assert main(["kernels", "--clear"]) == 0 and choice.choices() == {}
    finally:
        choice.CHOICES._table = None
