"""libmmvision against a float64 numpy CLIP on mmproj files written here (random weights).

Covers both file layouts (ours and the legacy published one), every weight type gguf-py can
write, GELU flavours, both projectors, several feature layers, batching, and the C-level
failure paths (they must return a status and a message, never abort the process).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mmchat.native import NativeError, NativeVisionModel, load_library
from mmchat.native.model import (
    MMV_ERR_FORMAT,
    MMV_ERR_INVALID_ARGUMENT,
    MMV_ERR_IO,
    MMV_ERR_UNSUPPORTED,
)
from mmchat.vision.synthetic import (
    ClipSpec,
    random_weights,
    reference_embeddings,
    rel_l2,
    write_mmproj,
)

SPECS = {
    "quick_gelu": ClipSpec(),
    "gelu_mlp_norm": ClipSpec(use_gelu=True, projector="mlp_norm", n_head=2),
    "two_features": ClipSpec(feature_layers=(1, 3), n_layer=4),
    "square_ffn": ClipSpec(hidden=32, n_ff=32, patch_size=16),
}
# tolerance per stored weight type against float64 (reference on the same, unrounded weights)
TOL = {"f32": 1e-5, "f16": 3e-3, "bf16": 2e-2, "q8_0": 5e-2}
# against the stored (rounded) weights: ggml rounds the activations of an f16/bf16/q8_0
# matmul to the weight's dot type (measured ~4e-4, ~3e-3, ~1e-2 on these towers)
ARITH_TOL = {"f32": 1e-5, "f16": 1.5e-3, "bf16": 1e-2, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def lib():  # type: ignore[no-untyped-def]
    import llama_cpp  # noqa: F401  (one ggml per process, as in production)

    return load_library()


def _pixels(spec: ClipSpec, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, spec.image_size, spec.image_size)).astype(np.float32)


def _dequantized(path: Path, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights as the file stores them (rounded), in torch layout, our names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    legacy = "clip.has_llava_projector" in r.fields
    out = dict(weights)
    for t in r.tensors:
        name = t.name
        if legacy and ".ffn_" in name:
            name = (
                name.replace(".ffn_up.", ".ffn_tmp.")
                .replace(".ffn_down.", ".ffn_up.")
                .replace(".ffn_tmp.", ".ffn_down.")
            )
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        out[name] = arr.reshape(weights[name].shape)
    return out


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("layout", ["mmchat", "legacy"])
def test_matches_numpy_reference(lib, tmp_path: Path, spec_name: str, layout: str) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS[spec_name]
    w = random_weights(spec, seed=7)
    px = _pixels(spec, 3)
    ref = reference_embeddings(spec, w, px)
    for wt in ("f32", "f16", "bf16", "q8_0"):
        path = write_mmproj(tmp_path / f"{wt}.gguf", spec, w, layout=layout, weight_type=wt)
        with NativeVisionModel(lib, path, device="cpu", n_threads=2, max_batch=2) as m:
            info = m.info
            assert info.n_tokens == spec.n_patches
            assert info.n_embd == spec.n_embd_out
            assert info.n_layer_run == max(spec.resolved_feature_layers)
            assert info.legacy_layout == (layout == "legacy" and not spec.feature_layers)
            out = m.encode(px)  # 3 images in batches of 2 + 1
        assert out.shape == (3, spec.n_patches, spec.n_embd_out)
        assert out.dtype == np.float32
        # against the exact weights: the rounding of the stored weights is all the error
        err = rel_l2(out, ref)
        stored_wt = "f16" if layout == "legacy" and wt == "f32" else wt
        assert err < TOL[stored_wt], f"{spec_name}/{layout}/{wt}: {err:.2e}"
        # against the stored (rounded) weights: only arithmetic differences remain
        ref_q = reference_embeddings(spec, _dequantized(path, w), px)
        err_q = rel_l2(out, ref_q)
        assert err_q < ARITH_TOL[stored_wt], f"{spec_name}/{layout}/{wt} vs stored: {err_q:.2e}"


def test_legacy_layout_equals_ours(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    w = random_weights(spec, seed=3)
    ours = write_mmproj(tmp_path / "ours.gguf", spec, w, layout="mmchat", weight_type="f16")
    legacy = write_mmproj(tmp_path / "legacy.gguf", spec, w, layout="legacy", weight_type="f16")
    px = _pixels(spec, 2)
    with NativeVisionModel(lib, ours, device="cpu") as a, NativeVisionModel(lib, legacy) as b:
        assert not a.info.ffn_swapped and b.info.ffn_swapped
        assert a.info.n_layer_file == spec.n_layer and b.info.n_layer_file == spec.n_layer - 1
        assert a.info.n_layer_run == b.info.n_layer_run == spec.n_layer - 1
        ea, eb = a.encode(px), b.encode(px)
    # ours keeps the position embedding f32, the legacy writer rounds it to f16
    assert rel_l2(eb, ea) < 2e-3


def test_batching_and_threads_do_not_change_results(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    path = write_mmproj(tmp_path / "m.gguf", spec, random_weights(spec, 1))
    px = _pixels(spec, 5)
    with NativeVisionModel(lib, path, device="cpu", n_threads=1, max_batch=1) as one:
        singles = np.concatenate([one.encode(px[i]) for i in range(5)])
        one.set_n_threads(2)
        again = one.encode(px[:1])
    with NativeVisionModel(lib, path, device="cpu", n_threads=2, max_batch=4) as many:
        batched = many.encode(px)
    assert rel_l2(batched, singles) < 1e-6
    assert rel_l2(again, singles[:1]) < 1e-6


def test_device_selection(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    path = write_mmproj(tmp_path / "m.gguf", spec, random_weights(spec, 1))
    names = [d.name for d in lib.devices()]
    with NativeVisionModel(lib, path) as auto:
        assert auto.info.device in names
        gpus = [d.name for d in lib.devices() if d.is_gpu]
        assert auto.info.device == (gpus[0] if gpus else auto.info.device)
    with NativeVisionModel(lib, path, device="CPU") as cpu:
        assert cpu.info.device in names
    with pytest.raises(NativeError) as exc:
        NativeVisionModel(lib, path, device="NoSuchDevice7")
    assert exc.value.status == MMV_ERR_INVALID_ARGUMENT
    assert "NoSuchDevice7" in str(exc.value)


# --- failures: status + message, process alive ----------------------------------------


def _load_error(lib, path: Path, **kw: object) -> NativeError:  # type: ignore[no-untyped-def]
    with pytest.raises(NativeError) as exc:
        NativeVisionModel(lib, path, **kw)  # type: ignore[arg-type]
    return exc.value


def test_missing_and_non_gguf_files(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    e = _load_error(lib, tmp_path / "nope.gguf")
    assert e.status == MMV_ERR_IO and "cannot open" in str(e)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    e = _load_error(lib, junk)
    assert e.status == MMV_ERR_FORMAT and "not a GGUF" in str(e)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert _load_error(lib, empty).status == MMV_ERR_FORMAT


@pytest.mark.parametrize("keep", [0.999, 0.6, 0.05, 0.001])
def test_truncated_file(lib, tmp_path: Path, keep: float) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    good = write_mmproj(tmp_path / "good.gguf", spec, random_weights(spec, 1))
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: max(4, int(len(data) * keep))])
    e = _load_error(lib, bad)
    assert e.status == MMV_ERR_FORMAT
    assert "truncated" in str(e) or "damaged" in str(e)


def test_projector_width_mismatch(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    path = write_mmproj(tmp_path / "m.gguf", spec, random_weights(spec, 1))
    e = _load_error(lib, path, expected_n_embd=spec.n_embd_out + 8)
    assert e.status == MMV_ERR_FORMAT
    assert f"{spec.n_embd_out}-wide" in str(e) and str(spec.n_embd_out + 8) in str(e)
    with NativeVisionModel(lib, path, expected_n_embd=spec.n_embd_out) as ok:
        assert ok.info.n_embd == spec.n_embd_out


def test_unknown_projector_type(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = dataclasses.replace(SPECS["quick_gelu"])
    path = tmp_path / "m.gguf"
    write_mmproj(path, spec, random_weights(spec, 1))
    _rewrite_string(path, "clip.projector_type", "mlp", "zzz")
    e = _load_error(lib, path)
    assert e.status == MMV_ERR_UNSUPPORTED and "'zzz'" in str(e)


def test_text_gguf_as_mmproj(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gguf import GGUFWriter

    path = tmp_path / "text.gguf"
    w = GGUFWriter(str(path), arch="llama")
    w.add_uint32("llama.embedding_length", 64)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    e = _load_error(lib, path)
    assert e.status == MMV_ERR_FORMAT and "architecture is 'llama'" in str(e)


def test_wrong_tensor_shapes_and_missing_tensors(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    w = random_weights(spec, 1)
    bad = dict(w)
    bad["v.blk.1.attn_q.weight"] = np.zeros((spec.hidden, spec.hidden + 1), np.float32)
    path = write_mmproj(tmp_path / "shape.gguf", spec, bad)
    e = _load_error(lib, path)
    assert e.status == MMV_ERR_FORMAT and "v.blk.1.attn_q.weight" in str(e) and "shape" in str(e)
    missing = {k: v for k, v in w.items() if k != "v.class_embd"}
    path = write_mmproj(tmp_path / "missing.gguf", spec, missing)
    e = _load_error(lib, path)
    assert e.status == MMV_ERR_FORMAT and "missing tensor v.class_embd" in str(e)
    pos = dict(w)
    pos["v.position_embd.weight"] = w["v.position_embd.weight"][:-1]
    e = _load_error(lib, write_mmproj(tmp_path / "pos.gguf", spec, pos))
    assert e.status == MMV_ERR_FORMAT and "v.position_embd.weight" in str(e)


def test_bad_hyperparameters(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    w = random_weights(spec, 1)
    path = write_mmproj(tmp_path / "m.gguf", dataclasses.replace(spec, n_head=5), w)
    e = _load_error(lib, path)
    assert e.status == MMV_ERR_FORMAT and "head_count" in str(e)
    path = write_mmproj(
        tmp_path / "fl.gguf", dataclasses.replace(spec, feature_layers=(spec.n_layer + 2,)), w
    )
    e = _load_error(lib, path)
    assert e.status == MMV_ERR_FORMAT and "feature_layer" in str(e)


def test_encode_argument_checks(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["quick_gelu"]
    path = write_mmproj(tmp_path / "m.gguf", spec, random_weights(spec, 1))
    m = NativeVisionModel(lib, path)
    with pytest.raises(ValueError):
        m.encode(np.zeros((1, 3, spec.image_size + 1, spec.image_size), np.float32))
    import ctypes

    status = lib.lib.mmv_encode(m._handle, None, 1, None, 0)
    assert status == MMV_ERR_INVALID_ARGUMENT and "NULL" in lib.last_error()
    m.close()
    with pytest.raises(NativeError):
        m.encode(_pixels(spec, 1))
    assert lib.lib.mmv_model_load(b"", None, ctypes.byref(ctypes.c_void_p())) != 0


def _rewrite_string(path: Path, key: str, old: str, new: str) -> None:
    """Replace a same-length string value in place (a GGUF string is length + bytes)."""
    assert len(old) == len(new)
    data = bytearray(path.read_bytes())
    k = key.encode()
    at = data.find(k)
    assert at > 0
    v = data.find(old.encode(), at + len(k))
    assert v > 0
    data[v : v + len(old)] = new.encode()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("ftype_name", "types"),
    [("LLAMA_FTYPE_MOSTLY_Q4_K_M", {"Q4_K"}), ("LLAMA_FTYPE_MOSTLY_Q6_K", {"Q6_K"})],
)
def test_k_quants_from_llama_quantize(
    lib, tmp_path: Path, ftype_name: str, types: set[str]
) -> None:  # type: ignore[no-untyped-def]
    """K-quant mmproj files (made by llama.cpp's own quantizer) run with the weights as stored."""
    import ctypes

    import llama_cpp
    from gguf import GGUFReader

    spec = ClipSpec(hidden=256, n_ff=512, proj_hidden=256, n_embd_out=256)  # K-quant rows: 256
    w = random_weights(spec, 2)
    src = write_mmproj(tmp_path / "f32.gguf", spec, w)
    dst = tmp_path / "kq.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = getattr(llama_cpp, ftype_name)
    assert (
        llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        == 0
    )
    stored = {t.tensor_type.name for t in GGUFReader(dst).tensors}
    assert types <= stored
    px = _pixels(spec, 2)
    with NativeVisionModel(lib, dst, device="cpu") as m:
        out = m.encode(px)
    # against the dequantized weights only ggml's q8_K rounding of activations remains
    err = rel_l2(out, reference_embeddings(spec, _dequantized(dst, w), px))
    assert err < 3e-2, f"{ftype_name}: {err:.2e}"


def test_fused_and_explicit_attention_agree(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS["gelu_mlp_norm"]
    w = random_weights(spec, 4)
    path = write_mmproj(tmp_path / "m.gguf", spec, w)
    px = _pixels(spec, 3)
    ref = reference_embeddings(spec, w, px)
    with NativeVisionModel(lib, path, device="cpu", max_batch=2) as fused:
        assert fused.info.flash_attn  # the CPU backend runs it on f32 K/V
        a = fused.encode(px)
    with NativeVisionModel(lib, path, device="cpu", max_batch=2, flash_attn=False) as plain:
        assert not plain.info.flash_attn
        b = plain.encode(px)
    assert rel_l2(a, ref) < 1e-5 and rel_l2(b, ref) < 1e-5
