"""NeVA ``.nemo`` layouts NeMo also writes, rewritten from the fixtures inside the tests (issue
17): pipeline-parallel 2, O2's ``model.module.``, local-spec layer norms, the older fused
``fast-swiglu``, Megatron-core distributed checkpoints (torch_dist), an unpacked folder; each
must give the fixture's golden logits. Plus refusals: unknown tensors, code in a pickle."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.neva import FX, convert_fails, decode_with_image, needs_torch, write_tar

from mmchat.errors import UserError
from mmchat.vision.synthetic import rel_l2

# --- the same weights in the other layouts NeMo writes (rewritten from the fixtures) ------


def _load_ckpt(data: bytes) -> dict[str, Any]:
    import torch

    with torch.serialization.safe_globals([io.BytesIO, bytes]):
        sd: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    return sd


def _save_ckpt(sd: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _pp2(cfg: dict[str, Any], shards: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pipeline-parallel 2: layer 0 + embeddings + projector, then layer 1 (numbered 0 in
    its stage, as Megatron does) + final norm + output layer."""
    (sd,) = shards.values()
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    for k, v in sd.items():
        if ".layers.1." in k:
            second[k.replace(".layers.1.", ".layers.0.")] = v
        elif "final_layernorm" in k or "output_layer" in k:
            second[k] = v
        else:
            first[k] = v
    cfg["pipeline_model_parallel_size"] = 2
    return {"tp_rank_00_pp_rank_000": first, "tp_rank_00_pp_rank_001": second}


def _o2(cfg: dict[str, Any], shards: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """megatron_amp_O2: every key under model.module."""
    cfg["megatron_amp_O2"] = True
    return {d: {"model.module." + k[6:]: v for k, v in sd.items()} for d, sd in shards.items()}


def _local_norms(
    cfg: dict[str, Any], shards: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Megatron-core's local spec: layer norms as their own modules."""
    ren = {
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    }
    out = {}
    for d, sd in shards.items():
        new = {}
        for k, v in sd.items():
            for a, b in ren.items():
                k = k.replace(a, b)
            new[k] = v
        out[d] = new
    return out


def _fast_swiglu(
    cfg: dict[str, Any], shards: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The older layout with 'fast-swiglu': dense_h_to_4h holds [gate_r; up_r] per shard."""
    import torch

    cfg["activation"] = "fast-swiglu"
    out = {}
    for d, sd in shards.items():
        new = dict(sd)
        for k in [k for k in sd if k.endswith("dense_h_to_4h_2.weight")]:
            gate = k.replace("dense_h_to_4h_2", "dense_h_to_4h")
            new[gate] = torch.cat([sd[gate], sd[k]])
            del new[k]
        out[d] = new
    return out


VARIANTS = {
    "pp2": ("neva_llama_linear", _pp2),
    "o2": ("neva_llama_linear", _o2),
    "local_norms": ("neva_llama_down", _local_norms),
    "fast_swiglu": ("neva_llama_tp2", _fast_swiglu),
}


@needs_torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_layouts_convert_to_the_same_model(variant: str, tmp_path: Path) -> None:
    from mmchat.converters import convert

    name, edit = VARIANTS[variant]
    src = _rewrite(name, edit, tmp_path / f"{variant}.nemo")
    r = convert(src, outdir=tmp_path / "o", quant="f32", vision_tower=FX / "clip_tower")
    gold = np.load(FX / f"{name}.goldens.npz")
    ids = [int(x) for x in gold["ids"]]
    got = decode_with_image(r.model_path, ids, int(gold["first"]), gold["rows"])
    assert rel_l2(got, gold["logits"]) < 2e-3


@needs_torch
def test_unknown_tensors_are_refused_not_dropped(tmp_path: Path) -> None:
    """A qk-norm (or anything else this converter does not map) is an error, not a silently
    different model."""
    import torch

    def add_qk_norm(
        cfg: dict[str, Any], shards: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        for sd in shards.values():
            sd["model.decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(16)
        return shards

    src = _rewrite("neva_llama_linear", add_qk_norm, tmp_path / "qk.nemo")
    convert_fails(src, tmp_path / "o", "does not know how to convert")


def _rewrite(name: str, edit: Any, dst: Path) -> Path:
    """A fixture archive with its config and weight shards passed through ``edit``."""
    import yaml

    with tarfile.open(FX / f"{name}.nemo") as tar:
        members = {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    cfg = yaml.safe_load(members.pop("model_config.yaml"))
    shards = {
        k.rpartition("/")[0]: _load_ckpt(members.pop(k))
        for k in [k for k in members if k.endswith("model_weights.ckpt")]
    }
    for d, sd in edit(cfg, shards).items():
        members[f"{d}/model_weights.ckpt" if d else "model_weights.ckpt"] = _save_ckpt(sd)
    members = {"model_config.yaml": yaml.safe_dump(cfg).encode(), **members}
    return write_tar(dst, members)


@needs_torch
def test_code_in_the_weights_pickle_is_refused(tmp_path: Path) -> None:
    import os

    import torch

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    buf = io.BytesIO()
    torch.save({"model.embedding.word_embeddings.weight": torch.ones(2, 2), "x": Evil()}, buf)
    members = {"model_config.yaml": b"mm_cfg: {}\n", "model_weights.ckpt": buf.getvalue()}
    convert_fails(
        write_tar(tmp_path / "e.nemo", members), tmp_path / "o", "cannot be loaded safely"
    )
    assert not (tmp_path / "pwned").exists()


@needs_torch
def test_unpacked_folder_and_no_temporaries_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unpacked .nemo converts the same; the private temp folder is gone afterwards, after
    a success and after a failure."""
    import gc
    import tempfile

    from mmchat.converters import convert

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    folder = tmp_path / "unpacked"
    with tarfile.open(FX / "neva_llama_tp2.nemo") as tar:
        for m in tar.getmembers():
            if m.isfile():
                dest = folder / m.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    r = convert(folder, outdir=tmp_path / "o", quant="f32", vision_tower=FX / "clip_tower")
    assert r.name == "unpacked"
    gold = np.load(FX / "neva_llama_tp2.goldens.npz")
    ids = [int(x) for x in gold["ids"]]
    got = decode_with_image(r.model_path, ids, int(gold["first"]), gold["rows"])
    assert rel_l2(got, gold["logits"]) < 2e-3
    gc.collect()
    assert list(scratch.iterdir()) == []
    convert(FX / "neva_llama_linear.nemo", outdir=tmp_path / "o2", vision_tower=FX / "clip_tower")
    assert list(scratch.iterdir()) == []  # no cycle: released as soon as the plan is gone
    with pytest.raises(UserError):
        convert(FX / "neva_llama_linear.nemo", outdir=tmp_path / "o3", vision_tower=tmp_path)
    gc.collect()
    assert list(scratch.iterdir()) == []


# --- Megatron-core distributed checkpoints (model_weights/, torch_dist) --------------------


def _write_dcp(
    tensors: dict[str, list[tuple[tuple[int, ...], Any]]], extra: list[str]
) -> dict[str, bytes]:
    """Files of a torch_dist checkpoint as torch's FileSystemWriter lays them out: chunks
    torch.save'd back to back in per-rank ``__R_0.distcp`` files, a pickled Metadata with
    every tensor's global size, its chunks and their byte ranges. ``tensors``: global name ->
    [(chunk offsets, chunk tensor)], chunk i written by "rank" i % 2."""
    import pickle

    import torch
    import torch.distributed.checkpoint.metadata as M
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    files: dict[str, io.BytesIO] = {"__0_0.distcp": io.BytesIO(), "__1_0.distcp": io.BytesIO()}
    sd_meta: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for k, name in enumerate(extra):  # Transformer Engine's _extra_state: bytes items
        f = "__0_0.distcp"
        off = files[f].tell()
        files[f].write(b"fp8-meta")
        sd_meta[name] = M.BytesStorageMetadata()
        storage[M.MetadataIndex(name, None, k)] = _StorageInfo(f, off, 8)
    for name, chunks in tensors.items():
        first = chunks[0][1]
        size = [0] * first.dim()
        metas = []
        for i, (offs, t) in enumerate(chunks):
            f = f"__{i % 2}_0.distcp"
            start = files[f].tell()
            torch.save(t.clone(), files[f])
            storage[M.MetadataIndex(name, torch.Size(offs), i)] = _StorageInfo(
                f, start, files[f].tell() - start
            )
            metas.append(M.ChunkStorageMetadata(torch.Size(offs), t.shape))
            size = [max(s, o + n) for s, o, n in zip(size, offs, t.shape, strict=True)]
        props = M.TensorProperties(dtype=first.dtype)
        sd_meta[name] = M.TensorStorageMetadata(props, torch.Size(size), metas)
    md = M.Metadata(state_dict_metadata=sd_meta, storage_data=storage)
    out = {f"model_weights/{k}": v.getvalue() for k, v in files.items()}
    out["model_weights/.metadata"] = pickle.dumps(md)
    out["model_weights/metadata.json"] = json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    ).encode()
    return out


def _as_dist(sd: dict[str, Any], *, singleton_swiglu: bool) -> dict[str, bytes]:
    """A model_weights.ckpt state dict as Megatron-core saves it distributed: decoder layers
    stacked on a leading axis (one chunk per layer, rows split in two like TP=2 shards),
    a swiglu fc1 as [gates; ups] or as singleton ``_w``/``_v`` keys."""
    import re

    import torch

    layered: dict[str, dict[int, Any]] = {}
    tensors: dict[str, list[tuple[tuple[int, ...], Any]]] = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        m = re.match(r"^(.*\.layers\.)(\d+)\.(.*)$", k)
        if m:
            layered.setdefault(m.group(1) + m.group(3), {})[int(m.group(2))] = t
        else:
            half = t.shape[0] // 2
            tensors[k] = [((0,) * t.dim(), t[:half]), ((half,) + (0,) * (t.dim() - 1), t[half:])]
    for key, per_layer in layered.items():
        parts = {key: per_layer}
        if singleton_swiglu and key.endswith("linear_fc1.weight"):
            gates = {i: t.chunk(2)[0] for i, t in per_layer.items()}
            ups = {i: t.chunk(2)[1] for i, t in per_layer.items()}
            parts = {key + "_w": gates, key + "_v": ups}
        for name, layers in parts.items():
            chunks = []
            for i, t in sorted(layers.items()):
                t = t.unsqueeze(0)
                if t.dim() >= 3 and t.shape[1] % 2 == 0:
                    h = t.shape[1] // 2
                    chunks.append(((i, 0) + (0,) * (t.dim() - 2), t[:, :h]))
                    chunks.append(((i, h) + (0,) * (t.dim() - 2), t[:, h:]))
                else:
                    chunks.append(((i,) + (0,) * (t.dim() - 1), t))
            tensors[name] = chunks
    extra = ["model.decoder.layers.self_attention.core_attention._extra_state/shard_0_2"]
    return _write_dcp(tensors, extra)


@needs_torch
@pytest.mark.parametrize(
    ("name", "singleton"), [("neva_llama_linear", False), ("neva_llama_down", True)]
)
def test_distributed_checkpoint(name: str, singleton: bool, tmp_path: Path) -> None:
    from mmchat.converters import convert

    with tarfile.open(FX / f"{name}.nemo") as tar:
        members = {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    sd = _load_ckpt(members.pop("model_weights.ckpt"))
    members.update(_as_dist(sd, singleton_swiglu=singleton))
    src = write_tar(tmp_path / "dist.nemo", members)
    r = convert(src, outdir=tmp_path / "o", quant="f32", vision_tower=FX / "clip_tower")
    gold = np.load(FX / f"{name}.goldens.npz")
    ids = [int(x) for x in gold["ids"]]
    got = decode_with_image(r.model_path, ids, int(gold["first"]), gold["rows"])
    assert rel_l2(got, gold["logits"]) < 2e-3


@needs_torch
def test_distributed_checkpoint_metadata_with_code_is_refused(tmp_path: Path) -> None:
    import os
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    members = {
        "model_config.yaml": b"mm_cfg: {}\n",
        "model_weights/.metadata": pickle.dumps(Evil()),
        "model_weights/__0_0.distcp": b"",
    }
    convert_fails(
        write_tar(tmp_path / "e.nemo", members), tmp_path / "o", "not checkpoint metadata"
    )
    assert not (tmp_path / "pwned").exists()
