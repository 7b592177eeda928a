"""The native kernels' cache is private and verified; every failure falls back with one warning."""

import errno
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

import flexunet
from flexunet.kernels import native

if native._compiler() is None and not os.environ.get("CI"):
    pytest.skip("no C compiler here: the cache is never written", allow_module_level=True)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private default cache under tmp_path and a library() that is evaluated anew."""
    home = tmp_path / "xdg"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.delenv("FLEXUNET_CACHE_DIR", raising=False)
    monkeypatch.delenv("FLEXUNET_NATIVE", raising=False)
    native.library.cache_clear()
    yield home / "flexunet"
    native.library.cache_clear()


def _output(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.fixture(scope="module")
def case():
    """A model whose 3x3 convolutions use the kernels, an input, and its output on the PyTorch paths."""
    torch.manual_seed(0)
    model = flexunet.UNet(filters=16, down_blocks=2, up_blocks=2).eval()
    x = torch.rand(1, 1, 32, 32)
    os.environ["FLEXUNET_NATIVE"] = "0"
    native.library.cache_clear()
    try:
        plain = _output(model, x)
    finally:
        del os.environ["FLEXUNET_NATIVE"]
        native.library.cache_clear()
    return model, x, plain


def _falls_back(case, match):
    """library() warns once (matching `match`) and returns None; outputs equal the PyTorch paths'."""
    model, x, plain = case
    with pytest.warns(RuntimeWarning, match=match) as record:
        assert native.library() is None
    assert len([w for w in record if "native CPU kernels unavailable" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once, not at every call
        assert torch.equal(_output(model, x), plain)


def _build_once(directory: Path) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return native._build(native._compiler(), directory)


def test_the_default_cache_is_created_private(fresh):
    assert native.library() is not None
    mode = stat.S_IMODE(fresh.stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)
    assert any(p.suffix == ".so" for p in fresh.iterdir())


def test_a_world_writable_cache_dir_is_refused_for_the_private_default(fresh, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("FLEXUNET_CACHE_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match=r"shared is writable by others \(mode 777\).*cached in .*xdg"):
        assert native.library() is not None
    assert list(shared.iterdir()) == []  # nothing built into, nor loaded from, the shared folder
    assert any(p.suffix == ".so" for p in fresh.iterdir())


def test_a_group_writable_default_cache_falls_back(fresh, case):
    fresh.mkdir(mode=0o700)
    fresh.chmod(0o770)
    _falls_back(case, "writable by its group")
    assert list(fresh.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="ownership is a POSIX notion")
def test_a_cache_owned_by_another_user_falls_back(fresh, case, monkeypatch):
    fresh.mkdir(mode=0o700)
    other = os.getuid() + 1
    monkeypatch.setattr(native.os, "getuid", lambda: other)
    _falls_back(case, "owned by user id")


@pytest.mark.parametrize("damage", ["truncated", "foreign", "no digest record"])
def test_a_damaged_or_foreign_library_is_not_loaded(fresh, case, damage):
    library = _build_once(fresh)
    if damage == "truncated":
        library.write_bytes(library.read_bytes()[:4096])
    elif damage == "foreign":
        library.write_bytes(Path(torch.__file__).with_name("lib").joinpath("libc10.so").read_bytes())
    else:
        library.with_suffix(".sha256").unlink()
    _falls_back(case, "digest")


def test_a_compiler_that_fails_falls_back(fresh, case, tmp_path, monkeypatch):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'internal compiler error' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    _falls_back(case, "broken-cc failed: internal compiler error")


def test_no_compiler_falls_back(fresh, case, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    _falls_back(case, "no C compiler")


@pytest.mark.parametrize("code,text", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left")])
def test_a_read_only_or_full_cache_falls_back(fresh, case, monkeypatch, code, text):
    # Root ignores permission bits, so the file system's answer is injected where the build writes.
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(native.tempfile, "TemporaryDirectory", refuse)
    _falls_back(case, text)


def test_an_uncreatable_cache_dir_falls_back(fresh, case, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where a folder must go
    _falls_back(case, "cannot be created")
