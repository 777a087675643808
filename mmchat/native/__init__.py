"""ctypes binding of libmmvision, mmchat's native vision engine (see native/include/mmvision.h).

The library links the ggml that llama-cpp-python ships. ``llama_cpp`` is imported before
the library is opened so the dynamic loader reuses the already-loaded ``libggml*`` (one ggml
instance, one backend registry).
"""

from __future__ import annotations

from mmchat.native.library import (
    DeviceInfo,
    NativeLibrary,
    NativeUnavailableError,
    find_library,
    load_library,
)
from mmchat.native.model import ModelInfo, NativeError, NativeVisionModel

__all__ = [
    "DeviceInfo",
    "ModelInfo",
    "NativeError",
    "NativeLibrary",
    "NativeUnavailableError",
    "NativeVisionModel",
    "find_library",
    "load_library",
]
