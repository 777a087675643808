"""The server's model manager with a stand-in loader: load once, share, keep-alive,
eviction of idle models, reload for another context size, never close a busy model."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mmchat.errors import UserError
from mmchat.server.models import ModelManager


@dataclass
class FakeModel:
    path: Path
    n_ctx: int
    closed: bool = False

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


@dataclass
class FakeRecord:
    name: str
    id: str = "id1"
    params: dict[str, Any] = field(default_factory=dict)
    model_path: Path = Path("/nonexistent/model.gguf")
    mmproj_path: Path | None = None
    template: str | None = None


class Loader:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.models: list[FakeModel] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, model: Path, mmproj: Path | None, options: Any, **kw: Any) -> FakeModel:
        self.calls.append((str(model), options.n_ctx))
        time.sleep(self.delay)
        if self.fail:
            raise UserError(f"{model} is not a GGUF file")
        m = FakeModel(model, options.n_ctx or 4096)
        self.models.append(m)
        return m


def manager(loader: Loader, **kw: Any) -> ModelManager:
    kw.setdefault("keep_alive_s", 300.0)
    return ModelManager(loader=loader, **kw)


def rec(name: str, **kw: Any) -> FakeRecord:
    return FakeRecord(name, model_path=Path(f"/m/{name}.gguf"), **kw)


def test_loads_once_and_shares() -> None:
    loader = Loader()
    mgr = manager(loader)
    a = mgr.acquire(rec("a"))
    b = mgr.acquire(rec("a"))
    assert a.model is b.model and len(loader.calls) == 1
    assert a.load_ms > 0 or a.load_ms == 0.0
    assert b.load_ms == 0.0
    mgr.release(a)
    mgr.release(b)
    assert [e.name for e in mgr.loaded()] == ["a"] and not a.model.closed


def test_concurrent_first_requests_load_once() -> None:
    loader = Loader(delay=0.2)
    mgr = manager(loader)
    leases: list[Any] = []

    def first() -> None:
        leases.append(mgr.acquire(rec("a")))

    threads = [threading.Thread(target=first) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loader.calls) == 1 and len({id(x.model) for x in leases}) == 1
    assert sorted(x.load_ms > 0 for x in leases) == [False, False, False, True]


def test_keep_alive_zero_and_expiry() -> None:
    loader = Loader()
    mgr = manager(loader)
    lease = mgr.acquire(rec("a"), keep_alive_s=0)
    mgr.release(lease, 0)
    assert lease.model.closed and mgr.loaded() == []
    lease = mgr.acquire(rec("a"), keep_alive_s=0.05)
    mgr.release(lease, 0.05)
    assert mgr.reap() == []  # not yet
    time.sleep(0.08)
    assert mgr.reap() == ["a"] and lease.model.closed


def test_forever_and_the_reaper_thread() -> None:
    loader = Loader()
    mgr = manager(loader)
    mgr.start()
    try:
        forever = mgr.acquire(rec("a"), keep_alive_s=None)
        mgr.release(forever, None)
        brief = mgr.acquire(rec("b"), keep_alive_s=0.1)
        mgr.release(brief, 0.1)
        deadline = time.monotonic() + 3
        while brief.model.closed is False and time.monotonic() < deadline:
            time.sleep(0.05)
        assert brief.model.closed and not forever.model.closed
        assert [e.name for e in mgr.loaded()] == ["a"]
    finally:
        mgr.close()
    assert forever.model.closed  # close() unloads everything idle


def test_a_busy_model_is_never_closed() -> None:
    loader = Loader()
    mgr = manager(loader, max_loaded=1)
    busy = mgr.acquire(rec("a"), keep_alive_s=0)
    other = mgr.acquire(rec("b"))  # over max_loaded, but "a" is busy: both stay
    assert not busy.model.closed
    assert mgr.unload("a") is True and not busy.model.closed  # unload waits for idle
    mgr.release(busy, 0)
    assert busy.model.closed
    mgr.release(other)


def test_least_recently_used_idle_model_is_evicted() -> None:
    loader = Loader()
    mgr = manager(loader, max_loaded=2)
    for name in ("a", "b"):
        mgr.release(mgr.acquire(rec(name)))
    mgr.release(mgr.acquire(rec("a")))  # "a" used last: "b" is the LRU
    mgr.release(mgr.acquire(rec("c")))
    assert sorted(e.name for e in mgr.loaded()) == ["a", "c"]
    assert [m.closed for m in loader.models] == [False, True, False]


def test_another_context_size_reloads_after_the_busy_request() -> None:
    loader = Loader()
    mgr = manager(loader)
    first = mgr.acquire(rec("a"))
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(mgr.acquire(rec("a"), num_ctx=256)))
    t.start()
    time.sleep(0.1)
    assert not got and not first.model.closed  # waits for the request holding the model
    mgr.release(first)
    t.join(5)
    assert got and got[0].model.n_ctx == 256 and first.model.closed
    mgr.release(got[0])
    # no num_ctx: the default context again (a reload), not whatever is loaded
    again = mgr.acquire(rec("a"))
    assert again.model.n_ctx == 4096 and len(loader.calls) == 3
    mgr.release(again)
    same = mgr.acquire(rec("a"), num_ctx=4096)  # the loaded size asked explicitly: shared
    assert same.model is again.model
    mgr.release(same)


def test_a_changed_store_entry_is_reloaded() -> None:
    loader = Loader()
    mgr = manager(loader)
    mgr.release(mgr.acquire(rec("a", id="v1")))
    lease = mgr.acquire(rec("a", id="v2"))
    assert len(loader.calls) == 2 and loader.models[0].closed
    mgr.release(lease)


def test_stored_num_ctx_is_the_default() -> None:
    loader = Loader()
    mgr = manager(loader)
    mgr.release(mgr.acquire(rec("a", params={"num_ctx": 2048})))
    assert loader.calls[-1][1] == 2048


def test_a_failed_load_leaves_nothing_behind() -> None:
    mgr = manager(Loader(fail=True))
    with pytest.raises(UserError, match="not a GGUF"):
        mgr.acquire(rec("a"))
    assert mgr.loaded() == []


def test_resolve_cache_follows_the_manifest(tmp_path: Path) -> None:
    """Resolved records are cached by manifest identity: a re-registered model (other
    params), a removed model and a missing blob are all seen on the next request."""
    from support.models import converted

    from mmchat.errors import NotFoundError
    from mmchat.store import Store

    model, _ = converted("llava15_hf")
    store = Store(tmp_path)
    store.register("a", model=model, params={"temperature": 0.5})
    mgr = ModelManager(loader=Loader(), store=store)
    first = mgr.resolve("a")
    assert mgr.resolve("a") is first  # cached
    store.register("a", model=model, params={"temperature": 0.25})
    assert mgr.resolve("a").params["temperature"] == 0.25
    blob = mgr.resolve("a").model_path
    blob.unlink()
    with pytest.raises(UserError, match="missing or damaged"):
        mgr.resolve("a")
    store.remove("a")
    with pytest.raises(NotFoundError):
        mgr.resolve("a")
