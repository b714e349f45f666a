"""Building the native kernels: where they cannot be built or loaded, `available()` says why
(and the CPU runs the torch backend) instead of raising from every call; a cached library file
that cannot be loaded is built again."""

from __future__ import annotations

import pytest

from tpserve.kernels import native


@pytest.fixture
def fresh_build(monkeypatch):
    """Forget this process's build for the test, and again after it."""
    native.available.cache_clear()
    native._build_and_load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native.available.cache_clear()
    native._build_and_load.cache_clear()


def test_an_unwritable_cache_is_reported_not_raised(fresh_build, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fresh_build.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # under a file: mkdir fails
    why_not = native.available()
    assert why_not is not None and "Error" in why_not
    with pytest.raises(native.NativeKernelsUnavailable):
        native.library()


def test_a_corrupt_cached_library_is_built_again(fresh_build, tmp_path):
    fresh_build.setenv("XDG_CACHE_HOME", str(tmp_path / "first"))
    assert native.available() is None
    (built,) = (tmp_path / "first" / "tpserve" / "kernels").glob("*.so")
    # The same file name in a second cache, holding junk (this process has the first one loaded).
    corrupt = tmp_path / "second" / "tpserve" / "kernels" / built.name
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a shared library")
    native.available.cache_clear()
    native._build_and_load.cache_clear()
    fresh_build.setenv("XDG_CACHE_HOME", str(tmp_path / "second"))
    assert native.available() is None
    assert corrupt.read_bytes()[:4] == b"\x7fELF"  # rebuilt in place of the junk
