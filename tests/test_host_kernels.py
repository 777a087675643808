"""libmmvision's hand-written CPU kernels (native/src/host_kernels.cpp) against float64 numpy.

On an AVX-512 CPU the CPU backend runs f16 linear layers, attention and exact GELU through
them: the activations stay f32, so an f16 file encodes to within f32 rounding of a float64
reference computed on the file's own (rounded) weights — ggml's own f16 path rounds the
activations to f16 and lands ~4e-4 away. The tower below is shaped so that every kernel is
taken (widths multiple of 32, head size 32, 65 tokens) and tails are exercised (65 rows is
not a multiple of the 12-row tile; 65 keys leave a last, overlapping 32-key panel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmchat.native import NativeVisionModel, load_library
from mmchat.native.library import NativeLibrary
from mmchat.vision.synthetic import (
    ClipSpec,
    random_weights,
    reference_embeddings,
    rel_l2,
    write_mmproj,
)

SPEC = ClipSpec(
    image_size=64, patch_size=8, hidden=64, n_ff=128, n_layer=3, n_head=2,
    proj_hidden=64, n_embd_out=96, use_gelu=True,
)  # fmt: skip


def _has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " f16c" in flags and " fma" in flags


pytestmark = pytest.mark.skipif(
    not _has_avx512(), reason="the host kernels need an x86 CPU with AVX-512F"
)


@pytest.fixture(scope="module")
def lib() -> NativeLibrary:
    import llama_cpp  # noqa: F401  (one ggml per process, as in production)

    return load_library()


def _stored(path: Path, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = dict(weights)
    for t in GGUFReader(path).tensors:
        out[t.name] = (
            dequantize(t.data, t.tensor_type).astype(np.float32).reshape(weights[t.name].shape)
        )
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_f16_file_is_exact_to_f32_rounding(lib: NativeLibrary, tmp_path: Path, batch: int) -> None:
    w = random_weights(SPEC, seed=11)
    px = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    path = write_mmproj(tmp_path / "f16.gguf", SPEC, w, weight_type="f16")
    with NativeVisionModel(lib, path, device="cpu", n_threads=2, max_batch=2) as m:
        out = m.encode(px)
    err = rel_l2(out, reference_embeddings(SPEC, _stored(path, w), px))
    assert err < 2e-5, f"f16 file vs float64 on its stored weights: {err:.2e}"


def test_threads_do_not_change_results(lib: NativeLibrary, tmp_path: Path) -> None:
    """Each thread owns whole 32-column panels / whole heads: the sums do not depend on it."""
    path = write_mmproj(
        tmp_path / "f16.gguf", SPEC, random_weights(SPEC, seed=5), weight_type="f16"
    )
    px = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    outs = []
    for n_threads in (1, 2, 3):
        with NativeVisionModel(lib, path, device="cpu", n_threads=n_threads, max_batch=2) as m:
            outs.append(m.encode(px))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
