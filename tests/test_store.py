"""The model store: names, blobs, manifests, registry, validation (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.fakehub import write_mmproj_gguf, write_text_gguf

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.hub.select import normalize_quant, quant_of, select_files
from mmchat.store import InvalidNameError, load_registry, open_store, parse_name
from mmchat.store.params import load_template, parse_params
from mmchat.store.store import Store


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ggufs")
    return {
        "text": write_text_gguf(d / "text.gguf"),
        "text2": write_text_gguf(d / "text2.gguf", seed=7, name="other"),
        "wide": write_text_gguf(d / "wide.gguf", n_embd=96),
        "mmproj": write_mmproj_gguf(d / "mmproj.gguf"),
        "legacy_mmproj": write_mmproj_gguf(d / "legacy.gguf", projection_dim=768),
    }


@pytest.fixture
def store(isolated_home: Path) -> Store:
    return open_store(isolated_home)


def _blobs(store: Store) -> list[str]:
    if not store.blobs_dir.exists():
        return []
    return sorted(p.name for p in store.blobs_dir.iterdir())


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("raw", "model", "tag", "repo"),
    [
        ("llava", "llava", "latest", None),
        ("LLaVA:13B", "llava", "13b", None),
        ("  bakllava  ", "bakllava", "latest", None),
        ("llava:1.6", "llava", "1.6", None),
        ("qwen2.5-vl:3b", "qwen2.5-vl", "3b", None),
        ("hf.co/ggml-org/gemma-3-4b-it-GGUF", "hf.co/ggml-org/gemma-3-4b-it-gguf", "latest",
         "ggml-org/gemma-3-4b-it-GGUF"),
        ("HF.CO/Org/Repo:Q4_K_M", "hf.co/org/repo", "q4_k_m", "Org/Repo"),
        ("huggingface.co/mys/ggml_bakllava-1", "hf.co/mys/ggml_bakllava-1", "latest",
         "mys/ggml_bakllava-1"),
        ("https://huggingface.co/a/b:q8_0", "hf.co/a/b", "q8_0", "a/b"),
    ],
)  # fmt: skip
def test_valid_names(raw: str, model: str, tag: str, repo: str | None) -> None:
    name = parse_name(raw)
    assert (name.model, name.tag, name.hf_repo) == (model, tag, repo)
    assert name.full == f"{model}:{tag}"


@pytest.mark.parametrize(
    "raw",
    [
        "", "   ", "..", "../x", "a/../b", "/etc/passwd", "~/models/x", "./x", "a/b",
        "llava/../../etc", "x:..", "x:../y", "x:a/b", "x\x00y", "x\ny", "x\ty", "x\\y",
        "C:\\models\\x", "C:/x", ".hidden", "x:", ":tag", "a:b:c", "x:.tag", "café\u202e",
        "hf.co", "hf.co/", "hf.co/org", "hf.co/org/", "hf.co/../x", "hf.co/org/..",
        "hf.co/org/repo/extra", "hf.co/a--b/c", "hf.co/org/re po", "hf.co/org/repo:",
        "hf.co/org/repo:../x", "x" * 200, "a b", "ll*va", "llava;rm -rf",
    ],
)  # fmt: skip
def test_malicious_names_rejected(raw: str, store: Store) -> None:
    with pytest.raises(InvalidNameError):
        parse_name(raw)
    with pytest.raises(UserError):
        store.resolve(raw)
    assert not store.manifests_dir.exists() or not any(store.manifests_dir.rglob("*.json"))


def test_manifest_paths_stay_in_the_store(store: Store) -> None:
    for raw in ("llava", "llava:13b", "hf.co/Org/Repo:q4_k_m"):
        path = store.manifest_path(parse_name(raw))
        assert store.manifests_dir.resolve() in path.resolve().parents
    assert store.manifest_path(parse_name("hf.co/Org/Repo:Q4_K_M")).relative_to(
        store.manifests_dir
    ) == Path("hf.co/org/repo/q4_k_m.json")


# ---------------------------------------------------------------------------- blobs + manifests
def test_register_and_resolve(store: Store, ggufs: dict[str, Path]) -> None:
    rec = store.register(
        "Tiny:v1",
        model=ggufs["text"],
        mmproj=ggufs["mmproj"],
        template="{{ messages }}",
        params={"temperature": 0.2},
        license="mit",
    )
    assert rec.name == "tiny:v1"
    again = store.resolve("TINY:V1")
    assert again.model_path == rec.model_path and again.mmproj_path == rec.mmproj_path
    assert again.model_path.read_bytes() == ggufs["text"].read_bytes()
    import hashlib

    digest = hashlib.sha256(ggufs["mmproj"].read_bytes()).hexdigest()
    assert rec.mmproj_path == store.blobs_dir / f"sha256-{digest}"
    manifest = json.loads((store.manifests_dir / "tiny" / "v1.json").read_text())
    assert manifest["schema"] == 1
    assert manifest["parts"]["mmproj"]["digest"] == f"sha256:{digest}"
    assert manifest["parts"]["mmproj"]["size"] == ggufs["mmproj"].stat().st_size
    assert manifest["parts"]["model"]["info"]["architecture"] == "llama"
    assert manifest["parts"]["mmproj"]["info"]["tokens_per_image"] == 576
    assert manifest["template"] == "{{ messages }}"
    assert manifest["params"] == {"temperature": 0.2}
    assert manifest["license"] == "mit"
    assert rec.capabilities == ["vision"] and rec.quant == "Q4_K_M"
    assert ggufs["text"].exists()  # not consumed without move=True


def test_register_move_link_copy(store: Store, ggufs: dict[str, Path], tmp_path: Path) -> None:
    moved = tmp_path / "moved.gguf"
    moved.write_bytes(ggufs["text"].read_bytes())
    rec = store.register("a", model=moved, move=True)
    assert not moved.exists() and rec.model_path.exists()

    linked = tmp_path / "linked.gguf"
    linked.write_bytes(ggufs["text2"].read_bytes())
    rec = store.register("b", model=linked)
    assert os.path.samefile(linked, rec.model_path)  # hard link: no second copy

    copied = tmp_path / "copied.gguf"
    copied.write_bytes(ggufs["wide"].read_bytes())
    rec = store.register("c", model=copied, link=False)
    assert not os.path.samefile(copied, rec.model_path)
    assert not [p for p in store.blobs_dir.iterdir() if p.name.startswith(".tmp")]


def test_shared_blob_stored_once_and_rm_keeps_it(store: Store, ggufs: dict[str, Path]) -> None:
    a = store.register("a", model=ggufs["text"], mmproj=ggufs["mmproj"])
    b = store.register("b", model=ggufs["text2"], mmproj=ggufs["mmproj"])
    assert a.mmproj_path == b.mmproj_path
    assert len(_blobs(store)) == 3
    full, deleted, freed = store.remove("a")
    assert (full, deleted, freed) == ("a:latest", 1, ggufs["text"].stat().st_size)
    assert not a.model_path.exists() and a.mmproj_path is not None and a.mmproj_path.exists()
    assert store.resolve("b").mmproj_path == b.mmproj_path
    store.remove("b")
    assert _blobs(store) == []
    assert not any(store.manifests_dir.iterdir())  # empty folders pruned too
    with pytest.raises(NotFoundError):
        store.remove("b")


def test_crash_between_blob_and_manifest_leaves_no_manifest(
    store: Store, ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: Store, path: Path, manifest: dict[str, object]) -> None:
        raise KeyboardInterrupt("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(Store, "_write_manifest", crash)
        with pytest.raises(KeyboardInterrupt):
            store.register("crashy", model=ggufs["text"], mmproj=ggufs["mmproj"])
    assert len(_blobs(store)) == 2  # blobs were written first...
    assert store.list_models() == []  # ...but no manifest points anywhere
    with pytest.raises(NotFoundError):
        store.resolve("crashy")
    rec = store.register("crashy", model=ggufs["text"], mmproj=ggufs["mmproj"])
    assert len(_blobs(store)) == 2 and rec.model_path.exists()


def test_crash_inside_manifest_write_leaves_old_manifest_intact(
    store: Store, ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store.register("m", model=ggufs["text"])
    before = (store.manifests_dir / "m" / "latest.json").read_text()
    import mmchat.store.store as store_mod

    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        real_replace(src, dst)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(store_mod.os, "replace", failing_replace)
        with pytest.raises(OSError):
            store.register("m", model=ggufs["text2"])
    assert (store.manifests_dir / "m" / "latest.json").read_text() == before
    assert [p.name for p in (store.manifests_dir / "m").iterdir()] == ["latest.json"]


def test_missing_blob_is_a_clear_error(store: Store, ggufs: dict[str, Path]) -> None:
    rec = store.register("x", model=ggufs["text"])
    rec.model_path.unlink()
    with pytest.raises(CorruptFileError, match=r"mmchat pull x:latest"):
        store.resolve("x")


def test_cp_shares_blobs(store: Store, ggufs: dict[str, Path]) -> None:
    a = store.register("a", model=ggufs["text"], mmproj=ggufs["mmproj"])
    b = store.copy("a", "B:copy")
    assert b.name == "b:copy" and b.model_path == a.model_path and b.id == a.id
    assert len(_blobs(store)) == 2
    store.remove("a")
    assert store.resolve("b:copy").model_path.exists()
    with pytest.raises(NotFoundError):
        store.copy("nope", "c")


# ---------------------------------------------------------------------------- validation
def test_register_validates_roles_and_width(store: Store, ggufs: dict[str, Path]) -> None:
    with pytest.raises(UserError, match=r"projector .*not a text model"):
        store.register("x", model=ggufs["mmproj"])
    with pytest.raises(UserError, match="not a projector"):
        store.register("x", model=ggufs["text"], mmproj=ggufs["text2"])
    with pytest.raises(UserError, match=r"width 64 .*embedding_length = 96"):
        store.register("x", model=ggufs["wide"], mmproj=ggufs["mmproj"])
    assert _blobs(store) == [] and store.list_models() == []


def test_legacy_projection_dim_uses_the_mm_weight(store: Store, ggufs: dict[str, Path]) -> None:
    # Old LLaVA converters write CLIP's projection_dim (768); the mm.2 weight is what counts.
    rec = store.register("legacy", model=ggufs["text"], mmproj=ggufs["legacy_mmproj"])
    assert rec.parts["mmproj"]["info"]["width"] == 64


def test_register_rejects_non_gguf_and_truncated(
    store: Store, ggufs: dict[str, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    with pytest.raises(CorruptFileError, match="not a GGUF"):
        store.register("x", model=junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ggufs["text"].read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="truncated"):
        store.register("x", model=cut)
    with pytest.raises(NotFoundError):
        store.register("x", model=tmp_path / "absent.gguf")
    assert store.list_models() == []


def test_params_and_template(tmp_path: Path) -> None:
    assert parse_params(["temperature=0.2", "num_ctx=4096", "stop=</s>", "stop=USER:"]) == {
        "temperature": 0.2,
        "num_ctx": 4096,
        "stop": ["</s>", "USER:"],
    }
    with pytest.raises(UserError, match="Unknown parameter 'tempature'"):
        parse_params(["tempature=1"])
    with pytest.raises(UserError, match="integer"):
        parse_params(["num_ctx=big"])
    with pytest.raises(UserError, match="key=value"):
        parse_params(["temperature"])
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert "for m" in load_template(good)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(UserError, match="line 1"):
        load_template(bad)


# ---------------------------------------------------------------------------- registry
def test_builtin_registry_entries(isolated_home: Path) -> None:
    reg = load_registry(isolated_home)
    bak = reg.lookup("bakllava")
    assert bak is not None and bak.source.repo == "mys/ggml_bakllava-1"
    assert (bak.source.model, bak.source.mmproj) == (
        "ggml-model-q4_k.gguf",
        "mmproj-model-f16.gguf",
    )
    for name, repo in [
        ("llava", "mys/ggml_llava-v1.5-7b"),
        ("llava:7b", "mys/ggml_llava-v1.5-7b"),
        ("llava:13b", "mys/ggml_llava-v1.5-13b"),
        ("llava:1.6", "cmp-nct/llava-1.6-gguf"),
        ("gemma3", "ggml-org/gemma-3-4b-it-GGUF"),
        ("qwen2.5-vl", "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF"),
        ("smolvlm", "ggml-org/SmolVLM-500M-Instruct-GGUF"),
        ("internvl3", "ggml-org/InternVL3-1B-Instruct-GGUF"),
        ("moondream", "ggml-org/moondream2-20250414-GGUF"),
        ("pixtral", "ggml-org/pixtral-12b-GGUF"),
        ("ultravox", "ggml-org/ultravox-v0_5-llama-3_2-1b-GGUF"),
    ]:
        entry = reg.lookup(name)
        assert entry is not None and entry.source.repo == repo, name
        assert entry.family, name
    assert reg.lookup("gemma3") is not None
    assert reg.lookup("nope") is None and reg.lookup("llava:99b") is None


def test_user_registry_extends_and_overrides(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "registry.json").write_text(
        json.dumps(
            {
                "models": {
                    "llava": {"tags": {"mine": {"repo": "me/llava-GGUF", "quant": "Q8_0"}}},
                    "local-demo": {
                        "family": "llava",
                        "tags": {"latest": {"type": "local", "model": "m.gguf"}},
                    },
                }
            }
        )
    )
    reg = load_registry(isolated_home)
    mine = reg.lookup("llava:mine")
    assert mine is not None and mine.source.quant == "Q8_0" and mine.family == "llava"
    assert reg.lookup("llava:13b") is not None  # built-in tags kept
    local = reg.lookup("local-demo")
    assert local is not None and local.source.type == "local"
    assert local.source.base_dir == isolated_home
    (isolated_home / "registry.json").write_text("{broken")
    with pytest.raises(CorruptFileError, match=r"registry\.json"):
        load_registry(isolated_home)


# ---------------------------------------------------------------------------- file selection
@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("gemma-3-4b-it-Q4_K_M.gguf", "Q4_K_M"),
        ("ggml-model-q4_k.gguf", "q4_k"),
        ("mistral-7b-q_5_k.gguf", "q_5_k"),
        ("bakllava-1.Q8_0.gguf", "Q8_0"),
        ("mmproj-model-f16.gguf", "f16"),
        ("Qwen2.5-VL-3B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("README.md", None),
    ],
)
def test_quant_of(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant
    assert normalize_quant("q4_k") == normalize_quant("Q4_K_M")


def test_select_files() -> None:
    listing = [
        "m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-f16.gguf", "mmproj-m-Q8_0.gguf", "mmproj-m-f16.gguf",
        "README.md",
    ]  # fmt: skip
    sel = select_files(listing, repo="o/r")
    assert (sel.model, sel.mmproj, sel.notes) == ("m-Q4_K_M.gguf", "mmproj-m-f16.gguf", ())
    assert select_files(listing, repo="o/r", quant="q8_0").model == "m-Q8_0.gguf"
    with pytest.raises(NotFoundError, match=r"No Q2_K GGUF in o/r; available: Q4_K_M, Q8_0, f16"):
        select_files(listing, repo="o/r", quant="q2_k")
    sel = select_files(["m-Q5_K_M.gguf", "m-Q8_0.gguf", "m-F16.gguf"], repo="o/r")
    assert sel.model == "m-Q5_K_M.gguf" and sel.mmproj is None
    assert any("Q4_K_M is not in o/r" in n for n in sel.notes)
    assert any("text-only" in n for n in sel.notes)
    sel = select_files(["ggml-model-q4_k.gguf", "ggml-model-f16.gguf"], repo="o/r")
    assert sel.model == "ggml-model-q4_k.gguf"  # q4_k is llama.cpp's alias of Q4_K_M
    with pytest.raises(NotFoundError, match=r"'x\.gguf' not found"):
        select_files(listing, repo="o/r", model="x.gguf")
    with pytest.raises(UserError, match="split GGUF"):
        select_files(["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"], repo="o/r")
