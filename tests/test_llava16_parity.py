"""LLaVA 1.6 (anyres) parity with the reference, on the converted fixtures.

Our mmproj through libmmvision + mmchat.vision.anyres against the goldens
(``tests/fixtures/llava16_*/goldens.npz``): final image features (base view, unpadded tile
grid, image_newline) and the final logits with an image. llama.cpp's mtmd runs on the same
file and images and its numbers are printed beside ours: it tiles the image but neither
unpads nor uses image_newline (DESIGN.md §3), so its token count differs, and its per-view
embeddings carry the class-token bug. Run with ``-s`` to see the tables.
"""

from __future__ import annotations

import ctypes
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError
from mmchat.vision import EmbeddingCache, load_image, open_vision
from mmchat.vision.engine import LlavaEngine
from mmchat.vision.synthetic import rel_l2

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
NEXT = ["llava16_hf", "llava16_orig"]
TOLERANCE = {"f32": 1e-3, "f16": 5e-3}


@cache
def goldens(fixture: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    folder = FIXTURES_DIR / fixture
    with np.load(folder / "goldens.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((folder / "goldens.json").read_text())


def converted(fixture: str, quant: str = "f32", vision_quant: str = "f32") -> tuple[Path, Path]:
    from support.models import converted as conv

    return conv(fixture, quant, vision_quant)


class TextModel:
    """A bare llama_model* (what mtmd needs next to the mmproj)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        from mmchat.runtime._llama import ensure_backend

        ensure_backend(False)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.ptr, f"cannot load {path}"
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.ptr))

    @property
    def address(self) -> int:
        return int(ctypes.cast(self.ptr, ctypes.c_void_p).value or 0)

    def close(self) -> None:
        import llama_cpp

        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


def mtmd_image_embeddings(mmproj: Path, llama_model: int, n_embd: int, img: Any) -> np.ndarray:
    """Every image chunk mtmd makes of ``img`` (LLaVA 1.6: the overview, then the slices),
    encoded and concatenated: what llama.cpp would feed its LLM."""
    from llama_cpp import mtmd_cpp as M

    from mmchat.vision.mtmd import _quiet_mtmd_logs

    _quiet_mtmd_logs(M)
    p = M.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.warmup, p.print_timings = False, 2, False, False
    ctx = M.mtmd_init_from_file(str(mmproj).encode(), llama_model, p)
    assert ctx, "mtmd_init_from_file failed"
    try:
        rgb = img.image.tobytes()
        buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        bmp = M.mtmd_bitmap_init(img.width, img.height, buf)
        chunks = M.mtmd_input_chunks_init()
        txt = M.mtmd_input_text()
        marker = M.mtmd_default_marker()
        txt.text, txt.text_len, txt.add_special, txt.parse_special = marker, len(marker), 0, 1
        try:
            bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bmp)
            assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(txt), bitmaps, 1) == 0
            parts = []
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
                assert M.mtmd_encode_chunk(ctx, chunk) == 0
                out = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * n_embd,))
                parts.append(np.array(out, dtype=np.float32).reshape(n, n_embd))
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bmp)
    finally:
        M.mtmd_free(ctx)
    return np.concatenate(parts)


def _mtmd_numbers(mt: np.ndarray, item: dict[str, Any], g: dict[str, Any]) -> str:
    """mtmd's token count and its error where a comparison means something."""
    want, views = g[item["keys"]["embeds"]], g[item["keys"]["tile_embeds"]]
    flat = views.reshape(-1, views.shape[-1])
    n = mt.shape[0]
    if mt.shape == want.shape:
        return f"{n:4d} tok  final {rel_l2(mt, want):8.2e}"
    if mt.shape == flat.shape:
        return f"{n:4d} tok  views {rel_l2(mt, flat):8.2e} (no unpad, no newline)"
    if mt.shape == views[0].shape:
        return f"{n:4d} tok  base view only {rel_l2(mt, views[0]):8.2e}"
    return f"{n:4d} tok  (not comparable)"


@pytest.mark.parametrize("vision_quant", ["f32", "f16"])
@pytest.mark.parametrize("fixture", NEXT)
def test_image_features_match_reference(fixture: str, vision_quant: str) -> None:
    g, meta = goldens(fixture)
    model_path, mmproj = converted(fixture, "f32", vision_quant)
    tm = TextModel(model_path)
    ours = open_vision(mmproj, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
    assert isinstance(ours, LlavaEngine) and ours.anyres is not None
    tol = TOLERANCE[vision_quant]
    rows = []
    try:
        for item in meta["anyres"]["items"]:
            img = load_image(FIXTURES_DIR / item["file"])
            want = g[item["keys"]["embeds"]]
            assert ours.tokens_for(img) == item["n_tokens"] == want.shape[0]
            got = ours.encode(img).embeddings
            assert got.shape == want.shape and got.dtype == np.float32
            rows.append(
                (
                    item["name"],
                    item["n_tokens"],
                    rel_l2(got, want),
                    _mtmd_numbers(
                        mtmd_image_embeddings(mmproj, tm.address, tm.n_embd, img), item, g
                    ),
                )
            )
    finally:
        ours.close()
        tm.close()
    print(f"\n{fixture} mmproj {vision_quant}: image features, rel L2 vs reference")
    print(f"  {'image':10s} {'tokens':>6s} {'ours':>9s} | llama.cpp mtmd")
    for name, n, e, m in rows:
        print(f"  {name:10s} {n:6d} {e:9.2e} | {m}")
    for name, _, e, _ in rows:
        assert e <= tol, f"{fixture}/{vision_quant}/{name}: {e:.2e} > {tol}"


@pytest.mark.parametrize("fixture", NEXT)
def test_all_views_of_all_images_go_to_the_encoder_in_one_call(fixture: str) -> None:
    g, meta = goldens(fixture)
    model_path, mmproj = converted(fixture, "f32", "f32")
    tm = TextModel(model_path)
    eng = open_vision(mmproj, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
    tm.close()
    assert isinstance(eng, LlavaEngine)
    calls: list[int] = []
    real = eng.model.encode

    def counting(px: np.ndarray) -> np.ndarray:
        calls.append(int(px.shape[0]))
        return real(px)

    eng.model.encode = counting  # type: ignore[method-assign]
    try:
        items = meta["anyres"]["items"][:5]
        imgs = [load_image(FIXTURES_DIR / it["file"]) for it in items]
        embs = eng.encode_many(imgs)
        assert calls == [sum(it["n_views"] for it in items)]
        for it, emb in zip(items, embs, strict=True):
            assert rel_l2(emb.embeddings, g[it["keys"]["embeds"]]) <= 1e-3
        # cached now: no encoder call, same embeddings
        again = eng.encode(imgs[0])
        assert again.cached and calls == [sum(it["n_views"] for it in items)]
    finally:
        eng.close()


def test_llava15_mmproj_is_not_anyres() -> None:
    from support.models import converted as conv

    model_path, mmproj = conv("llava15_hf", "f32", "f32")
    tm = TextModel(model_path)
    try:
        eng = open_vision(mmproj, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
        assert isinstance(eng, LlavaEngine) and eng.anyres is None
        img = load_image(FIXTURES_DIR / "images" / "large.png")
        assert eng.tokens_for(img) == eng.info.n_tokens
        eng.close()
    finally:
        tm.close()


# -- the runtime: final logits with an image, context budget ------------------------------


def _load(fixture: str, **options: Any) -> Any:
    from mmchat.runtime import LoadOptions, load_model

    model_path, mmproj = converted(fixture, "f32", "f32")
    return load_model(
        model_path, mmproj, LoadOptions.parity(n_threads=2, vision_device="cpu", **options)
    )


@pytest.mark.parametrize("fixture", NEXT)
def test_final_logits_with_image(fixture: str) -> None:
    g, meta = goldens(fixture)
    _, mmproj = converted(fixture, "f32", "f32")
    lm = _load(fixture)
    try:
        assert isinstance(lm.vision, LlavaEngine) and lm.vision.anyres is not None
        print(f"\n{fixture} f32: final-position logits with an image, rel L2 vs reference")
        print(f"  {'prompt':26s} {'ours':>9s} {'top1':>9s} | llama.cpp mtmd's image tokens")
        for mm in meta["multimodal"]:
            item = next(it for it in meta["anyres"]["items"] if it["name"] == mm["image"])
            img = load_image(FIXTURES_DIR / item["file"])
            emb = lm.vision.encode(img)
            assert emb.n_tokens == mm["n_image_tokens"]
            k = mm["key"]
            before, after, want = g[f"{k}.ids_before"], g[f"{k}.ids_after"], g[f"{k}.logits"]
            ev = lm.evaluate_ids([before, emb.embeddings, after])
            err = rel_l2(ev.logits, want)
            top1 = int(np.argmax(ev.logits))
            mt = mtmd_image_embeddings(mmproj, lm.text.address, lm.n_embd, img)
            ev_mt = lm.evaluate_ids([before, mt, after])
            err_mt = rel_l2(ev_mt.logits, want)
            print(
                f"  {k} {mm['image']:9s} {mm['n_image_tokens']:3d} tok {err:9.2e} "
                f"{top1:4d}/{mm['top1']:<4d} | {mt.shape[0]:3d} tok {err_mt:9.2e} "
                f"top1 {int(np.argmax(ev_mt.logits))}"
            )
            assert err <= 2e-3, f"{fixture}/{k}: {err:.2e}"
            if mm["top1_robust"]:
                assert top1 == mm["top1"]
    finally:
        lm.close()


def test_chat_path_renders_tokenizes_and_encodes_like_the_reference() -> None:
    """llava16_hf through evaluate(messages): the folder's [INST] template, whole-prompt
    tokenization with <image>, anyres encoding, injection -> the golden logits."""
    g, meta = goldens("llava16_hf")
    mm = meta["multimodal"][0]
    item = next(it for it in meta["anyres"]["items"] if it["name"] == mm["image"])
    lm = _load("llava16_hf")
    try:
        img = load_image(FIXTURES_DIR / item["file"])
        ev = lm.evaluate([{"role": "user", "content": "What is this?", "images": [img]}])
        assert ev.image_embeddings[0].shape[0] == mm["n_image_tokens"]
        err = rel_l2(ev.logits, g[f"{mm['key']}.logits"])
        print(f"\nllava16_hf chat path {mm['key']}: rel L2 {err:.2e}")
        assert err <= 2e-3
    finally:
        lm.close()


def test_context_budget_counts_each_images_own_tokens_before_encoding() -> None:
    """The context budget uses the anyres token count of *this* image (not a fixed count):
    a prompt whose image makes it too long is refused before any encoder work, the session
    stays usable, and the same text with a smaller image goes through."""
    from mmchat.runtime import SamplingParams
    from mmchat.runtime.messages import Message
    from mmchat.runtime.model import count_positions

    _, meta = goldens("llava16_orig")
    items = {it["name"]: it for it in meta["anyres"]["items"]}
    tower, small = items["tower"], items["small"]  # 162 and 64 tokens
    lm = _load("llava16_orig", n_ctx=256)
    try:
        big_img = load_image(FIXTURES_DIR / tower["file"])
        small_img = load_image(FIXTURES_DIR / small["file"])

        def needed(img: Any, system: str) -> int:
            msg = Message(role="user", content="What is this?", images=[img])
            return count_positions(lm.build_prompt([msg], system=system))

        # a system prompt long enough that the small image fits and the tall one does not
        system = "Be careful."
        while needed(big_img, system) < lm.n_ctx:
            system += " Be careful."
        n_big, n_small = needed(big_img, system), needed(small_img, system)
        assert n_big - n_small == tower["n_tokens"] - small["n_tokens"]
        assert n_small + 4 <= lm.n_ctx <= n_big, (n_small, lm.n_ctx, n_big)
        before = lm.vision.encode_count
        chat = lm.session(system=system, params=SamplingParams(seed=1, max_tokens=4))
        with pytest.raises(UserError, match=f"needs {n_big} tokens"):
            list(chat.send("What is this?", [big_img]))
        assert lm.vision.encode_count == before  # refused before any encoder work
        assert not chat.visible_messages
        events = list(chat.send("What is this?", [small_img]))
        assert type(events[-1]).__name__ == "Done"
        assert events[-1].stats.prompt_tokens == n_small
    finally:
        lm.close()


# -- bad LLaVA 1.6 projector files -------------------------------------------------------


def rewrite_mmproj(
    src: Path,
    dst: Path,
    *,
    drop_keys: tuple[str, ...] = (),
    set_keys: dict[str, Any] | None = None,
    drop_tensors: tuple[str, ...] = (),
    replace_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A copy of an (f32) mmproj with metadata or tensors changed, written with gguf-py."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = GGUFWriter(str(dst), arch=arch)
    for key, fld in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, fld.contents(), vtype, sub_type=sub)
    for key, value in (set_keys or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, [int(x) for x in value])
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = (replace_tensors or {}).get(t.name, np.asarray(t.data))
        w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_faithful_copy_still_works(tmp_path: Path) -> None:
    """The rewriting helper itself keeps a working file (so the failures below are real)."""
    model_path, mmproj = converted("llava16_hf")
    copy = rewrite_mmproj(mmproj, tmp_path / "copy.gguf")
    tm = TextModel(model_path)
    try:
        eng = open_vision(copy, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
        assert isinstance(eng, LlavaEngine) and eng.anyres is not None
        assert eng.tokens_for(load_image(FIXTURES_DIR / "images" / "landscape.png")) == 70
        eng.close()
    finally:
        tm.close()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"drop_tensors": ("v.image_newline",)}, "CorruptFileError", "no v.image_newline"),
        (
            {"replace_tensors": {"v.image_newline": np.zeros(7, np.float32)}},
            "CorruptFileError",
            "v.image_newline has 7 values",
        ),
        (
            {
                "drop_keys": ("clip.vision.image_grid_pinpoints",),
                "set_keys": {"clip.vision.image_grid_pinpoints": [32, 64, 64]},
            },
            "CorruptFileError",
            "pairs",
        ),
        (
            {
                "drop_keys": ("clip.vision.image_grid_pinpoints",),
                "set_keys": {"clip.vision.image_grid_pinpoints": [32, 60]},
            },
            "CorruptFileError",
            "multiples of the image size 32",
        ),
        (
            {"drop_keys": ("clip.vision.mm_patch_merge_type",)},
            "UserError",
            "mm_patch_merge_type 'flat'",
        ),
        (
            {
                "drop_keys": ("mmchat.vision.unpad_rounding",),
                "set_keys": {"mmchat.vision.unpad_rounding": "ceil"},
            },
            "CorruptFileError",
            "unpad rounding",
        ),
    ],
)
def test_bad_anyres_files_fail_clearly(
    change: dict[str, Any], error: str, message: str, tmp_path: Path
) -> None:
    from mmchat import errors

    model_path, mmproj = converted("llava16_hf")
    bad = rewrite_mmproj(mmproj, tmp_path / "bad.gguf", **change)
    tm = TextModel(model_path)
    try:
        with pytest.raises(getattr(errors, error), match=message):
            open_vision(bad, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
        # the process is fine and the good file still opens
        eng = open_vision(mmproj, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
        eng.close()
    finally:
        tm.close()


def test_without_rounding_key_the_original_llava_rounding_applies(tmp_path: Path) -> None:
    """Files from other converters (llama.cpp's LLaVA 1.6 surgery) carry no rounding key:
    they come from original checkpoints, so original LLaVA's truncation is the default."""
    model_path, mmproj = converted("llava16_orig")
    plain = rewrite_mmproj(
        mmproj, tmp_path / "plain.gguf", drop_keys=("mmchat.vision.unpad_rounding",)
    )
    tm = TextModel(model_path)
    try:
        eng = open_vision(plain, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
        assert isinstance(eng, LlavaEngine) and eng.anyres is not None
        assert eng.anyres.unpad_rounding == "truncate"
        eng.close()
    finally:
        tm.close()
