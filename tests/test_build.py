"""The build's choices. The C++ compiler: one that links libstdc++ statically (the GPU image's
CXX=/opt/gcc/bin/g++ does) gives a kernel library whose number formatting crashes or prints
nothing, so the build replaces it with the system `c++`. The Python module: built only where
Python's headers are installed."""

import shutil
import stat

import pytest

from torchadam8 import _extension

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("readelf") is None,
                                reason="needs a C++ compiler and readelf")


def write_compiler(path, extra_link_flag):
    path.write_text(f'#!/bin/sh\ncase " $* " in *" -shared "*) exec c++ "$@" {extra_link_flag} ;; esac\nexec c++ "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_static_libstdcxx_compiler_is_replaced_by_system_cxx(tmp_path, monkeypatch):
    static = write_compiler(tmp_path / "g++-static", "-static-libstdc++")
    assert not _extension._links_libstdcxx_shared(static)
    monkeypatch.setenv("CXX", static)
    assert _extension._compiler_with_shared_libstdcxx() == shutil.which("c++")


def test_shared_libstdcxx_compiler_is_kept(tmp_path, monkeypatch):
    shared = write_compiler(tmp_path / "g++-shared", "")
    assert _extension._links_libstdcxx_shared(shared)
    monkeypatch.setenv("CXX", shared)
    assert _extension._compiler_with_shared_libstdcxx() is None
    monkeypatch.delenv("CXX")
    assert _extension._compiler_with_shared_libstdcxx() is None


def test_library_has_its_python_module_only_where_python_headers_are_installed(monkeypatch):
    names = lambda: [s.name for s in _extension._sources(with_cuda=False)]  # noqa: E731
    monkeypatch.setattr(_extension, "python_headers", lambda: False)
    assert "host.cpp" not in names() and "versions.cpp" in names()
    monkeypatch.setattr(_extension, "python_headers", lambda: True)
    assert "host.cpp" in names()
