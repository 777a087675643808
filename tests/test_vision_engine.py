"""open_vision: header validation, routing (libmmvision vs mtmd), the embedding caches."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.vision import (
    EmbeddingCache,
    ImageEmbedding,
    LlavaEngine,
    PreparedImage,
    load_image,
    open_vision,
)
from mmchat.vision.cache import file_digest
from mmchat.vision.synthetic import (
    ClipSpec,
    random_weights,
    reference_embeddings,
    rel_l2,
    write_mmproj,
)

SPEC = ClipSpec()


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mm") / "mmproj.gguf"
    return write_mmproj(path, SPEC, random_weights(SPEC, 5))


def _image(colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> PreparedImage:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return load_image(buf.getvalue())


def _engine(path: Path, **kw: object) -> LlavaEngine:
    eng = open_vision(path, text_n_embd=SPEC.n_embd_out, device="cpu", n_threads=2, **kw)  # type: ignore[arg-type]
    assert isinstance(eng, LlavaEngine)
    return eng


def test_llava_engine_matches_reference(mmproj: Path) -> None:
    with _engine(mmproj, cache=EmbeddingCache()) as eng:
        assert eng.projector_type == "mlp"
        assert eng.n_embd == SPEC.n_embd_out and eng.image_size == SPEC.image_size
        img = _image((200, 30, 90))
        assert eng.tokens_for(img) == SPEC.n_patches
        emb = eng.encode(img)
        assert isinstance(emb, ImageEmbedding)
        assert (
            emb.embeddings.shape
            == (SPEC.n_patches, SPEC.n_embd_out)
            == (
                emb.n_tokens,
                emb.n_embd,
            )
        )
        assert emb.embeddings.dtype == np.float32 and emb.embeddings.flags.c_contiguous
        assert not emb.non_causal and not emb.cached and emb.prefix_tokens == ()
        ref = reference_embeddings(SPEC, random_weights(SPEC, 5), eng.pixels(img)[None])[0]
        assert rel_l2(emb.embeddings, ref) < 1e-5


def test_cache_hits_do_not_encode_again(mmproj: Path) -> None:
    cache = EmbeddingCache()
    with _engine(mmproj, cache=cache) as eng:
        red, blue = _image((255, 0, 0)), _image((0, 0, 255))
        first = eng.encode(red)
        assert eng.encode_count == 1 and not first.cached
        again = eng.encode(load_image(_png_bytes((255, 0, 0))))  # same bytes, new object
        assert again.cached and eng.encode_count == 1
        assert again.embeddings is first.embeddings  # no copy
        assert not again.embeddings.flags.writeable
        many = eng.encode_many([blue, red, blue, blue])
        assert eng.encode_count == 2  # only blue, once
        assert [m.cached for m in many] == [False, True, True, True]
        assert np.array_equal(many[0].embeddings, many[2].embeddings)
    # a second engine on the same file shares the process-wide (here: given) cache
    with _engine(mmproj, cache=cache) as eng2:
        assert eng2.encode(red).cached and eng2.encode_count == 0


def _png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_batched_encode_equals_single(mmproj: Path) -> None:
    imgs = [_image((i * 40, 255 - i * 30, 7 * i), (10 + i, 30 - i)) for i in range(6)]
    with _engine(mmproj, cache=EmbeddingCache(), max_batch=4) as eng:
        batched = [e.embeddings for e in eng.encode_many(imgs)]
        assert eng.encode_count == 6
    with _engine(mmproj, cache=EmbeddingCache(), max_batch=1) as eng:
        single = [eng.encode(i).embeddings for i in imgs]
    for a, b in zip(batched, single, strict=True):
        assert rel_l2(a, b) < 1e-6


def test_lru_byte_budget(mmproj: Path) -> None:
    one = SPEC.n_patches * SPEC.n_embd_out * 4
    cache = EmbeddingCache(max_bytes=2 * one)
    with _engine(mmproj, cache=cache) as eng:
        a, b, c = _image((1, 1, 1)), _image((2, 2, 2)), _image((3, 3, 3))
        eng.encode(a)
        eng.encode(b)
        eng.encode(a)  # a is now the most recent
        eng.encode(c)  # evicts b
        assert len(cache) == 2 and cache.n_bytes == 2 * one
        assert eng.encode(a).cached
        assert not eng.encode(b).cached
        assert eng.encode_count == 4
    assert EmbeddingCache(max_bytes=0).max_bytes == 0


def test_disk_cache(mmproj: Path, isolated_home: Path) -> None:
    img = _image((10, 200, 10))
    with _engine(mmproj, cache=EmbeddingCache(), disk_cache=True) as eng:
        want = eng.encode(img).embeddings
    files = list((isolated_home / "cache" / "vision").rglob("*.npz"))
    assert len(files) == 1 and files[0].stem == img.digest
    assert file_digest(mmproj) in files[0].parent.name
    with _engine(mmproj, cache=EmbeddingCache(), disk_cache=True) as eng:
        got = eng.encode(img)
        assert got.cached and eng.encode_count == 0
        assert np.array_equal(got.embeddings, want)
    files[0].write_bytes(b"garbage")  # a damaged entry is dropped and recomputed
    with _engine(mmproj, cache=EmbeddingCache(), disk_cache=True) as eng:
        got = eng.encode(img)
        assert not got.cached and eng.encode_count == 1
        assert np.array_equal(got.embeddings, want)


def test_store_blob_names_give_the_digest_for_free(tmp_path: Path) -> None:
    blob = tmp_path / ("sha256-" + "ab" * 32)
    blob.write_bytes(b"whatever")
    assert file_digest(blob) == "ab" * 32
    other = tmp_path / "x.gguf"
    other.write_bytes(b"abc")
    assert file_digest(other) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- bad files: clear UserErrors before anything reaches C ---------------------------


def test_missing_and_non_gguf(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        open_vision(tmp_path / "nope.gguf", text_n_embd=64)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptFileError, match="not a GGUF"):
        open_vision(junk, text_n_embd=64)


def test_truncated_mmproj(mmproj: Path, tmp_path: Path) -> None:
    data = mmproj.read_bytes()
    for keep in (0.5, 0.98):
        bad = tmp_path / f"cut{keep}.gguf"
        bad.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CorruptFileError, match=r"truncated|damaged"):
            open_vision(bad, text_n_embd=SPEC.n_embd_out)


def test_text_gguf_passed_as_mmproj(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "model.gguf"
    w = GGUFWriter(str(path), arch="llama")
    w.add_uint32("llama.embedding_length", 64)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CorruptFileError) as e:
        open_vision(path, text_n_embd=64)
    assert "not a projector (mmproj) file" in str(e.value) and "'llama'" in str(e.value)


def test_projector_width_must_match_the_llm(mmproj: Path) -> None:
    with pytest.raises(UserError) as e:
        open_vision(mmproj, text_n_embd=SPEC.n_embd_out * 2)
    msg = str(e.value)
    assert f"{SPEC.n_embd_out}-wide" in msg and str(SPEC.n_embd_out * 2) in msg
    assert "\n" not in msg


def test_unknown_projector_type(tmp_path: Path) -> None:
    path = write_mmproj(tmp_path / "m.gguf", SPEC, random_weights(SPEC, 1))
    data = bytearray(path.read_bytes())
    at = data.find(b"clip.projector_type")
    v = data.find(b"mlp", at + 19)
    data[v : v + 3] = b"zzz"
    path.write_bytes(bytes(data))
    # routed to mtmd, which needs the text model
    with pytest.raises(UserError, match=r"'zzz'.*mtmd"):
        open_vision(path, text_n_embd=SPEC.n_embd_out)
    with pytest.raises(UserError, match="not a LLaVA projector"):
        open_vision(path, text_n_embd=SPEC.n_embd_out, engine="mmvision")


def test_bad_device_is_a_user_error(mmproj: Path) -> None:
    with pytest.raises(UserError, match="no compute device named 'Quantum9'"):
        open_vision(mmproj, text_n_embd=SPEC.n_embd_out, device="Quantum9")


# --- mtmd routing for a non-LLaVA projector -----------------------------------------


def write_gemma3_mmproj(path: Path, text_n_embd: int, seed: int = 0) -> Path:
    """A tiny random Gemma 3 (SigLIP + soft-emb-norm + input projection) mmproj."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    size, patch, hidden, ff, layers = 32, 4, 16, 32, 2
    w = GGUFWriter(str(path), arch="clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "gemma3")
    for key, val in (
        ("image_size", size),
        ("patch_size", patch),
        ("embedding_length", hidden),
        ("feed_forward_length", ff),
        ("block_count", layers),
        ("attention.head_count", 2),
        ("projection_dim", text_n_embd),
    ):
        w.add_uint32(f"clip.vision.{key}", val)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (0.2 * rng.standard_normal(shape)).astype(np.float32))

    t("v.patch_embd.weight", hidden, 3, patch, patch)
    t("v.patch_embd.bias", hidden)
    t("v.position_embd.weight", (size // patch) ** 2, hidden)
    for i in range(layers):
        b = f"v.blk.{i}."
        for nm in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t(b + nm + ".weight", hidden, hidden)
            t(b + nm + ".bias", hidden)
        for nm in ("ln1", "ln2"):
            w.add_tensor(b + nm + ".weight", np.ones(hidden, np.float32))
            t(b + nm + ".bias", hidden)
        t(b + "ffn_up.weight", ff, hidden)
        t(b + "ffn_up.bias", ff)
        t(b + "ffn_down.weight", hidden, ff)
        t(b + "ffn_down.bias", hidden)
    w.add_tensor("v.post_ln.weight", np.ones(hidden, np.float32))
    t("v.post_ln.bias", hidden)
    t("mm.input_projection.weight", hidden, text_n_embd)
    w.add_tensor("mm.soft_emb_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def llava_text_model() -> Iterator[object]:
    from support.models import converted
    from test_vision_parity import TextModel

    model_path, _ = converted("llava15_hf")
    tm = TextModel(model_path)
    yield tm
    tm.close()


def test_gemma3_projector_runs_on_mtmd(tmp_path: Path, llava_text_model: object) -> None:
    from mmchat.vision.mtmd import MtmdEngine

    tm = llava_text_model
    path = write_gemma3_mmproj(tmp_path / "gemma3.gguf", tm.n_embd)  # type: ignore[attr-defined]
    eng = open_vision(
        path,
        text_n_embd=tm.n_embd,  # type: ignore[attr-defined]
        llama_model=tm.address,  # type: ignore[attr-defined]
        device="cpu",
        cache=EmbeddingCache(),
    )
    try:
        assert isinstance(eng, MtmdEngine) and eng.projector_type == "gemma3"
        img = _image((30, 60, 250), (50, 20))
        n = eng.tokens_for(img)
        assert n == 4  # 8x8 patches, 4x4 average pooling
        emb = eng.encode(img)
        assert emb.embeddings.shape == (n, tm.n_embd)  # type: ignore[attr-defined]
        assert np.isfinite(emb.embeddings).all()
        assert emb.non_causal  # Gemma 3 attends to image tokens bidirectionally
        assert emb.prefix_tokens and emb.suffix_tokens  # <start_of_image> … <end_of_image>
        again = eng.encode(img)
        assert again.cached and eng.encode_count == 1
        assert again.non_causal and again.prefix_tokens == emb.prefix_tokens
    finally:
        eng.close()


def test_mtmd_rejects_a_projector_for_another_width(
    tmp_path: Path, llava_text_model: object
) -> None:
    tm = llava_text_model
    path = write_gemma3_mmproj(tmp_path / "gemma3.gguf", tm.n_embd + 8)  # type: ignore[attr-defined]
    with pytest.raises(CorruptFileError, match=r"llama.cpp \(mtmd\) cannot load"):
        open_vision(path, text_n_embd=tm.n_embd, llama_model=tm.address)  # type: ignore[attr-defined]
