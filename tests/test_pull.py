"""Pulling through the real huggingface_hub client from a local fake hub."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fakehub import FakeHub, write_mmproj_gguf, write_text_gguf

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.hub import DownloadInterrupted, Puller, PullProgress, ensure_model
from mmchat.store import open_store
from mmchat.store.store import Store

BAK = "mys/ggml_bakllava-1"
MODEL, MMPROJ = "ggml-model-q4_k.gguf", "mmproj-model-f16.gguf"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("hubfiles")
    return {
        "text": write_text_gguf(d / "t.gguf", pad_bytes=400_000).read_bytes(),
        "text_q8": write_text_gguf(d / "t8.gguf", seed=3, file_type=7).read_bytes(),
        "text_f16": write_text_gguf(d / "t16.gguf", seed=4, file_type=1).read_bytes(),
        "mmproj": write_mmproj_gguf(d / "p.gguf").read_bytes(),
        "mmproj_q8": write_mmproj_gguf(d / "p8.gguf", seed=5).read_bytes(),
    }


@pytest.fixture
def hub(files: dict[str, bytes]) -> Iterator[FakeHub]:
    with FakeHub() as h:
        h.add_repo(BAK, {MODEL: files["text"], MMPROJ: files["mmproj"], "README.md": b"# hi\n"})
        h.add_repo(
            "ggml-org/Tiny-VL-GGUF",
            {
                "Tiny-VL-Q4_K_M.gguf": files["text"],
                "Tiny-VL-Q8_0.gguf": files["text_q8"],
                "Tiny-VL-f16.gguf": files["text_f16"],
                "mmproj-Tiny-VL-f16.gguf": files["mmproj"],
                "mmproj-Tiny-VL-Q8_0.gguf": files["mmproj_q8"],
            },
        )
        yield h


@pytest.fixture
def store(isolated_home: Path) -> Store:
    return open_store(isolated_home)


def make_puller(store: Store, hub: FakeHub, **kw: object) -> Puller:
    kw.setdefault("retries", 0)
    kw.setdefault("backoff", 0.0)
    kw.setdefault("hf_cache", store.home / "hf-cache")
    return Puller(store, endpoint=hub.url, **kw)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs_dir.glob("*") if not p.name.startswith("sha256-"))


# ---------------------------------------------------------------------------- happy paths
def test_fresh_pull_of_a_registry_name(store: Store, hub: FakeHub, files: dict[str, bytes]) -> None:
    rec = make_puller(store, hub).pull("bakllava")
    assert rec.name == "bakllava:latest"
    assert rec.model_path.read_bytes() == files["text"]
    assert rec.mmproj_path is not None and rec.mmproj_path.read_bytes() == files["mmproj"]
    assert rec.model_path.name == f"sha256-{sha(files['text'])}"
    src = rec.manifest["source"]
    assert src["repo"] == BAK and src["revision"] == hub.repos[BAK.lower()].commit
    assert src["files"] == {"model": MODEL, "mmproj": MMPROJ}
    assert rec.manifest["family"] == "llava" and rec.license == "apache-2.0"
    assert hub.bytes_served == {MODEL: len(files["text"]), MMPROJ: len(files["mmproj"])}
    assert len(hub.downloads()) == 2
    # Downloads are pinned to the commit the listing came from.
    assert all(f"/resolve/{src['revision']}/" in r[1] for r in hub.downloads())
    assert leftovers(store) == []

    # Pulling again: the listing is checked, nothing is downloaded.
    hub.reset_counters()
    make_puller(store, hub).pull("bakllava")
    assert hub.downloads() == [] and sum(hub.bytes_served.values()) == 0


def test_hf_names_pick_quant_and_projector(
    store: Store, hub: FakeHub, files: dict[str, bytes]
) -> None:
    puller = make_puller(store, hub)
    plan = puller.plan("hf.co/ggml-org/Tiny-VL-GGUF")
    assert [(f.role, f.filename) for f in plan.files] == [
        ("model", "Tiny-VL-Q4_K_M.gguf"),
        ("mmproj", "mmproj-Tiny-VL-f16.gguf"),
    ]
    assert plan.total_size == len(files["text"]) + len(files["mmproj"])
    rec = puller.pull(plan)
    assert rec.name == "hf.co/ggml-org/tiny-vl-gguf:latest"
    rec8 = puller.pull("hf.co/ggml-org/Tiny-VL-GGUF:q8_0")
    assert rec8.name == "hf.co/ggml-org/tiny-vl-gguf:q8_0"
    assert rec8.model_path.read_bytes() == files["text_q8"] and rec8.quant == "Q8_0"
    assert rec8.mmproj_path == rec.mmproj_path  # the shared projector is stored once
    with pytest.raises(NotFoundError, match=r"No Q2_K GGUF in ggml-org/Tiny-VL-GGUF; available"):
        puller.plan("hf.co/ggml-org/Tiny-VL-GGUF:Q2_K")


def test_honours_hf_token(store: Store, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.require_token = "hf_secret"
    with pytest.raises(NotFoundError, match="set HF_TOKEN"):
        make_puller(store, hub).pull("bakllava")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    make_puller(store, hub).pull("bakllava")
    assert all(r[2].get("authorization") == "Bearer hf_secret" for r in hub.requests[-3:]), (
        hub.requests
    )


# ---------------------------------------------------------------------------- interruptions
def test_dropped_connection_resumes_without_refetching(
    store: Store, hub: FakeHub, files: dict[str, bytes]
) -> None:
    cut = 150_000
    hub.drop_after = {MODEL: cut}
    rec = make_puller(store, hub, retries=2).pull("bakllava")
    assert rec.model_path.read_bytes() == files["text"]
    assert hub.bytes_served[MODEL] == len(files["text"])  # not one byte twice
    ranges = [r[2].get("range") for r in hub.downloads(MODEL)]
    assert ranges == [None, f"bytes={cut}-"]


def test_interrupted_pull_resumes_in_a_later_run(
    store: Store, hub: FakeHub, files: dict[str, bytes]
) -> None:
    cut = 200_000
    hub.drop_after = {MODEL: cut}
    with pytest.raises(DownloadInterrupted, match="run the same command again to resume"):
        make_puller(store, hub).pull("bakllava")
    partial = store.partial_path(sha(files["text"]))
    assert partial.stat().st_size == cut
    assert store.list_models() == []  # nothing registered

    hub.drop_after = {}
    hub.reset_counters()
    rec = make_puller(store, hub).pull("bakllava")  # a new process would do the same
    assert rec.model_path.read_bytes() == files["text"]
    assert hub.bytes_served[MODEL] == len(files["text"]) - cut
    assert [r[2].get("range") for r in hub.downloads(MODEL)] == [f"bytes={cut}-"]
    assert not partial.exists() and leftovers(store) == []


def test_server_ignoring_range_restarts_cleanly(
    store: Store, hub: FakeHub, files: dict[str, bytes]
) -> None:
    cut = 100_000
    hub.drop_after = {MODEL: cut}
    hub.ignore_range = True
    rec = make_puller(store, hub, retries=1).pull("bakllava")
    assert rec.model_path.read_bytes() == files["text"]
    assert hub.bytes_served[MODEL] == cut + len(files["text"])


def test_cdn_redirect_gets_no_token(
    store: Store, hub: FakeHub, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub() as cdn:
        cdn.repos = hub.repos
        hub.redirect_lfs_to = cdn.url
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        rec = make_puller(store, hub).pull("bakllava")
        assert rec.model_path.read_bytes() == files["text"]
        assert hub.bytes_served == {} and len(cdn.downloads()) == 2
        assert all("authorization" not in r[2] for r in cdn.requests)
        assert all(r[2].get("authorization") == "Bearer hf_secret" for r in hub.requests)


def test_corrupt_download_is_rejected_and_deleted(
    store: Store, hub: FakeHub, files: dict[str, bytes]
) -> None:
    hub.corrupt = {MODEL}
    with pytest.raises(CorruptFileError, match=rf"{MODEL} from {BAK} is corrupt: sha256"):
        make_puller(store, hub).pull("bakllava")
    assert store.list_models() == []
    assert not store.has_blob(sha(files["text"]))
    assert leftovers(store) == []  # the bad partial file is gone
    hub.corrupt = set()
    assert make_puller(store, hub).pull("bakllava").model_path.read_bytes() == files["text"]


def _seed_hf_cache(cache: Path, repo: str, filename: str, data: bytes, digest: str) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).symlink_to(os.path.relpath(blob, snap))
    return blob


def test_hf_cache_copy_is_verified_and_reused_or_purged(
    store: Store, hub: FakeHub, files: dict[str, bytes]
) -> None:
    cache = store.home / "hf-cache"
    good = _seed_hf_cache(cache, BAK, MMPROJ, files["mmproj"], sha(files["mmproj"]))
    bad_bytes = bytearray(files["text"])
    bad_bytes[1000] ^= 0xFF
    bad = _seed_hf_cache(cache, BAK, MODEL, bytes(bad_bytes), sha(files["text"]))
    rec = make_puller(store, hub).pull("bakllava")
    assert hub.bytes_served[MMPROJ] == 0  # reused from the HF cache, verified
    assert rec.mmproj_path is not None and os.path.samefile(good, rec.mmproj_path)
    assert not bad.exists()  # the corrupt cached copy was deleted...
    assert not any(p.is_symlink() and p.name == MODEL for p in cache.rglob("*"))
    assert hub.bytes_served[MODEL] == len(files["text"])  # ...and downloaded properly
    assert rec.model_path.read_bytes() == files["text"]


# ---------------------------------------------------------------------------- not found
def test_unknown_repo_and_file_errors_name_them(store: Store, hub: FakeHub) -> None:
    puller = make_puller(store, hub)
    with pytest.raises(NotFoundError, match="repository nobody/nothing-GGUF not found"):
        puller.pull("hf.co/nobody/nothing-GGUF")
    with pytest.raises(NotFoundError, match="Unknown model 'nosuch:latest'"):
        puller.pull("nosuch")
    hub.missing = {MMPROJ}  # listed, but the download answers 404
    with pytest.raises(NotFoundError, match=rf"File '{MMPROJ}' not found in .*{BAK}"):
        puller.pull("bakllava")
    assert store.list_models() == []


def test_registry_file_missing_from_repo(
    store: Store, hub: FakeHub, files: dict[str, bytes]
) -> None:
    hub.add_repo(BAK, {MODEL: files["text"]})  # the projector is gone from the repo
    with pytest.raises(NotFoundError, match=rf"File '{MMPROJ}' not found in Hugging Face"):
        make_puller(store, hub).pull("bakllava")
    assert hub.downloads() == []


def test_server_errors_are_retried(store: Store, hub: FakeHub) -> None:
    hub.status = {MODEL: 503}
    with pytest.raises(DownloadInterrupted, match="HTTP 503"):
        make_puller(store, hub, retries=1).pull("bakllava")
    assert len([r for r in hub.requests if r[1].endswith("/" + MODEL)]) == 2  # 1 + 1 retry
    hub.status = {}
    assert make_puller(store, hub).pull("bakllava").model_path.exists()


# ---------------------------------------------------------------------------- concurrency
def test_two_concurrent_pulls_download_once(
    isolated_home: Path, hub: FakeHub, files: dict[str, bytes]
) -> None:
    hub.chunk_delay = 0.01  # ~ 0.1 s per file: the second pull has to wait for the first
    results: list[object] = []
    messages: list[str] = []

    class Recorder(PullProgress):
        def message(self, text: str) -> None:
            messages.append(text)

    def worker() -> None:
        try:
            store = open_store(isolated_home)  # separate objects, as in two processes
            results.append(make_puller(store, hub, progress=Recorder()).pull("bakllava"))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert hub.bytes_served == {MODEL: len(files["text"]), MMPROJ: len(files["mmproj"])}
    assert len(hub.downloads(MODEL)) == 1
    assert any("waiting for another mmchat" in m for m in messages)
    store = open_store(isolated_home)
    assert [r.name for r in store.list_models()] == ["bakllava:latest"]
    assert store.resolve("bakllava").model_path.read_bytes() == files["text"]


# ---------------------------------------------------------------------------- offline
def test_present_model_needs_no_network(
    store: Store, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_puller(store, hub).pull("bakllava")
    hub.reset_counters()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    rec = ensure_model("bakllava", store=store)
    assert rec.name == "bakllava:latest" and hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert ensure_model("BakLLaVA:latest", store=store).model_path == rec.model_path
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and llava:latest is not"):
        ensure_model("llava", store=store)
    assert hub.requests == []


def test_ensure_model_pulls_when_absent(
    store: Store, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    rec = ensure_model("bakllava", store=store)
    assert rec.model_path.exists() and len(hub.downloads()) == 2
    with pytest.raises(NotFoundError):
        ensure_model("llava", store=store, pull=False)


def test_local_registry_source(store: Store, hub: FakeHub, files: dict[str, bytes]) -> None:
    import json

    store.home.mkdir(parents=True, exist_ok=True)
    (store.home / "shipped").mkdir()
    (store.home / "shipped" / "m.gguf").write_bytes(files["text"])
    (store.home / "shipped" / "p.gguf").write_bytes(files["mmproj"])
    (store.home / "registry.json").write_text(
        json.dumps(
            {
                "models": {
                    "demo": {
                        "family": "llava",
                        "tags": {
                            "latest": {
                                "type": "local",
                                "model": "shipped/m.gguf",
                                "mmproj": "shipped/p.gguf",
                                "sha256": {"model": sha(files["text"])},
                            }
                        },
                    }
                }
            }
        )
    )
    rec = make_puller(store, hub).pull("demo")
    assert rec.model_path.read_bytes() == files["text"] and rec.family == "llava"
    assert hub.requests == []


def test_hf_hub_download_works_against_the_fake_hub(
    hub: FakeHub, tmp_path: Path, files: dict[str, bytes]
) -> None:
    """The fake hub speaks the layout huggingface_hub's own download code expects."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(BAK, MMPROJ, endpoint=hub.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == files["mmproj"]


def test_pulling_a_local_model_says_so(
    store: Store, hub: FakeHub, files: dict[str, bytes], tmp_path: Path
) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(files["text"])
    store.register("mine", model=f)
    with pytest.raises(UserError, match=r"mine:latest is a local model \(local\)"):
        make_puller(store, hub).pull("mine")
    assert hub.requests == []
