"""Locating, opening and checking libmmvision; device enumeration."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from mmchat.settings import load_settings

ABI_VERSION = 4

if sys.platform == "darwin":
    LIBRARY_NAME = "libmmvision.dylib"
elif sys.platform == "win32":
    LIBRARY_NAME = "mmvision.dll"
else:
    LIBRARY_NAME = "libmmvision.so"

DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator"}


class NativeUnavailableError(RuntimeError):
    """The native vision library is missing, cannot be opened, or does not match."""


class _DeviceInfoStruct(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 128),
        ("description", ctypes.c_char * 256),
        ("backend", ctypes.c_char * 64),
        ("type", ctypes.c_int32),
        ("memory_free", ctypes.c_uint64),
        ("memory_total", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class DeviceInfo:
    """One ggml compute device as the backend registry reports it."""

    index: int
    name: str
    description: str
    backend: str
    type: str
    memory_free: int
    memory_total: int

    @property
    def is_gpu(self) -> bool:
        return self.type in ("GPU", "iGPU")


def _installed_candidates() -> list[Path]:
    """Where an installed (or editable-installed) mmchat keeps the library."""
    here = Path(__file__).resolve().parent.parent / "_native" / LIBRARY_NAME
    found = [here]
    try:
        files = importlib.metadata.files("mmchat") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == LIBRARY_NAME:
            found.append(Path(str(f.locate())).resolve())
    return found


def find_library() -> Path | None:
    """The library file that would be loaded: ``MMCHAT_NATIVE_LIB`` first, then the install."""
    override = load_settings().native_lib
    if override is not None:
        return override
    for candidate in _installed_candidates():
        if candidate.is_file():
            return candidate
    return None


class NativeLibrary:
    """An opened libmmvision with its C functions typed."""

    def __init__(self, path: Path) -> None:
        import llama_cpp  # noqa: F401  (load llama.cpp's ggml first: one ggml per process)

        self.path = path
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NativeUnavailableError(f"cannot open {path}: {exc}") from exc
        lib = self.lib
        try:
            lib.mmv_abi_version.restype = ctypes.c_int32
            for name in ("mmv_version", "mmv_ggml_version", "mmv_ggml_commit", "mmv_last_error"):
                getattr(lib, name).restype = ctypes.c_char_p
            lib.mmv_device_count.restype = ctypes.c_int32
            lib.mmv_device_get_info.restype = ctypes.c_int
            lib.mmv_device_get_info.argtypes = [
                ctypes.c_int32,
                ctypes.POINTER(_DeviceInfoStruct),
            ]
            lib.mmv_ggml_build_version.restype = ctypes.c_char_p
        except AttributeError as exc:
            raise NativeUnavailableError(f"{path} is not a matching libmmvision: {exc}") from exc
        abi = lib.mmv_abi_version()
        if abi != ABI_VERSION:
            raise NativeUnavailableError(
                f"{path} has C ABI version {abi}, this mmchat needs {ABI_VERSION}; reinstall mmchat"
            )
        from mmchat.native.model import declare_model_functions

        try:
            declare_model_functions(lib)
        except AttributeError as exc:
            raise NativeUnavailableError(f"{path} is not a matching libmmvision: {exc}") from exc
        built, running = self.ggml_build_version, self.ggml_version
        if built != running:
            raise NativeUnavailableError(
                f"{path} was built against ggml {built} but ggml {running} is loaded "
                "(llama-cpp-python changed since mmchat was built); reinstall mmchat"
            )

    @property
    def version(self) -> str:
        return self.lib.mmv_version().decode()

    @property
    def ggml_version(self) -> str:
        return self.lib.mmv_ggml_version().decode()

    @property
    def ggml_build_version(self) -> str:
        return self.lib.mmv_ggml_build_version().decode()

    @property
    def ggml_commit(self) -> str:
        return self.lib.mmv_ggml_commit().decode()

    def last_error(self) -> str:
        return self.lib.mmv_last_error().decode(errors="replace")

    def devices(self) -> list[DeviceInfo]:
        """Every ggml compute device the backend registry reports."""
        result = []
        for i in range(self.lib.mmv_device_count()):
            info = _DeviceInfoStruct()
            if self.lib.mmv_device_get_info(i, ctypes.byref(info)) != 0:
                raise NativeUnavailableError(f"device {i}: {self.last_error()}")
            result.append(
                DeviceInfo(
                    index=i,
                    name=info.name.decode(errors="replace"),
                    description=info.description.decode(errors="replace"),
                    backend=info.backend.decode(errors="replace"),
                    type=DEVICE_TYPES.get(info.type, "accelerator"),
                    memory_free=int(info.memory_free),
                    memory_total=int(info.memory_total),
                )
            )
        return result


@functools.lru_cache(maxsize=4)
def _open(path: Path) -> NativeLibrary:
    return NativeLibrary(path)


def load_library() -> NativeLibrary:
    """Open (once per path) and check the native library, or raise NativeUnavailableError."""
    path = find_library()
    if path is None:
        raise NativeUnavailableError(
            f"{LIBRARY_NAME} is not installed with mmchat (reinstall with pip, see README)"
        )
    if not path.is_file():
        raise NativeUnavailableError(f"{path} does not exist (MMCHAT_NATIVE_LIB?)")
    return _open(path.resolve())
