"""The native library runs on llama-cpp-python's own ggml: one instance, one backend registry.

This is what makes a GPU build work: whatever backend llama.cpp was compiled with (CUDA,
Metal), the vision engine sees the very same devices.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")


def _mapped(name: str) -> set[str]:
    maps = Path("/proc/self/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if f"/{name}" in line}


def test_one_ggml_instance_shared_with_llama_cpp() -> None:
    import llama_cpp

    from mmchat.native import load_library

    lib = load_library()
    llama_lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        paths = _mapped(name)
        assert len(paths) == 1, f"{name} loaded more than once: {paths}"
        assert Path(next(iter(paths))).resolve().parent == llama_lib_dir.resolve()
    assert lib.ggml_version == lib.ggml_build_version


def test_same_device_registry_as_llama_cpp() -> None:
    from mmchat.native import load_library

    lib = load_library()
    (ggml_path,) = _mapped("libggml.so")
    ggml = ctypes.CDLL(ggml_path)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    names = [
        ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)).decode()
        for i in range(ggml.ggml_backend_dev_count())
    ]
    assert [d.name for d in lib.devices()] == names
    assert any(d.type == "CPU" for d in lib.devices())
