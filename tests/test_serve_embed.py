"""Embeddings over HTTP (``/api/embed``, ``/api/embeddings``, ``/v1/embeddings``), driven by
the official ``ollama`` and ``openai`` clients, checked against llama.cpp's own embedding
of the same text computed here with llama-cpp-python directly (``Llama(embedding=True)``):
mean pooling for the tiny LLaVA fixture (a chat model, whose GGUF names no pooling), and
the GGUF's own pooling (CLS) for a tiny random BERT embedding model written here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import pytest
from test_serve import LiveServer, start_server

from mmchat.runtime import LoadOptions
from mmchat.store import Store
from mmchat.vision.synthetic import rel_l2

N_CTX = 256
TEXTS = ["a red circle on a white background", "two blue squares, left to right", "x"]


def start(store: Store, **limits: Any) -> LiveServer:
    """A real server whose models use exact arithmetic (flash attention off, f32 KV cache)."""
    options = LoadOptions(n_ctx=N_CTX, n_threads=1, flash_attn=False, kv_cache_type="f32")
    return start_server(store, load_options=options, **limits)


@pytest.fixture(scope="module")
def model_path() -> Path:
    from support.models import converted

    return converted("llava15_hf")[0]


def write_tiny_bert(path: Path, *, pooling: int = 2, seed: int = 5) -> Path:
    """A tiny random BERT embedding model in llama.cpp's GGUF layout (WordPiece vocabulary,
    bidirectional attention, ``bert.pooling_type`` 2 = CLS), weights at a realistic scale."""
    import gguf

    rng = np.random.default_rng(seed)
    words = ["red", "circle", "blue", "square", "two", "on", "the", "white", "left"]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = (
        specials + ["▁" + w for w in words] + ["▁" + c for c in letters] + letters + ["▁,", "▁."]
    )
    types = [gguf.TokenType.CONTROL] * 5 + [gguf.TokenType.NORMAL] * (len(tokens) - 5)
    types[1] = gguf.TokenType.UNKNOWN
    n_vocab, n_embd, n_ff, n_layer, n_head, n_ctx = len(tokens), 32, 64, 2, 4, 128
    w = gguf.GGUFWriter(path, "bert")
    w.add_name("tiny-bert")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(pooling))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(2)
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_sep_token_id(3)
    w.add_unk_token_id(1)
    w.add_pad_token_id(0)
    w.add_mask_token_id(4)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)

    def t(name: str, *shape: int, scale: float = 0.2, around: float = 0.0) -> None:
        w.add_tensor(name, (around + scale * rng.standard_normal(shape)).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    t("token_types.weight", 2, n_embd)
    t("position_embd.weight", n_ctx, n_embd)
    t("token_embd_norm.weight", n_embd, scale=0.05, around=1.0)
    t("token_embd_norm.bias", n_embd, scale=0.05)
    for i in range(n_layer):
        for p in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{p}.weight", n_embd, n_embd)
            t(f"blk.{i}.{p}.bias", n_embd, scale=0.05)
        t(f"blk.{i}.attn_output_norm.weight", n_embd, scale=0.05, around=1.0)
        t(f"blk.{i}.attn_output_norm.bias", n_embd, scale=0.05)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.bias", n_ff, scale=0.05)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        t(f"blk.{i}.ffn_down.bias", n_embd, scale=0.05)
        t(f"blk.{i}.layer_output_norm.weight", n_embd, scale=0.05, around=1.0)
        t(f"blk.{i}.layer_output_norm.bias", n_embd, scale=0.05)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert.gguf")


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, model_path: Path, bert_path: Path
) -> Iterator[LiveServer]:
    store = Store(tmp_path_factory.mktemp("serve-embed"))
    store.register("tinytext", model=model_path)
    store.register("tinybert", model=bert_path)
    srv = start(store, max_inputs=8)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def direct(model_path: Path) -> Any:
    """llama.cpp's own embeddings of the fixture (mean pooling, same arithmetic settings)."""
    import llama_cpp

    def embed(text: str) -> np.ndarray:
        return llama_embed(model_path, text, llama_cpp.LLAMA_POOLING_TYPE_MEAN)

    return embed


def llama_embed(path: Path, text: str, pooling: int) -> np.ndarray:
    """llama-cpp-python's own embedding of ``text`` (``pooling`` -1: the GGUF's)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path),
        embedding=True,
        pooling_type=pooling,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        n_threads=1,
        n_gpu_layers=0,
        flash_attn=False,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        verbose=False,
    )
    try:
        return np.asarray(llm.embed(text), dtype=np.float64)
    finally:
        llm.close()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_ollama_embed_equals_llama_cpp_and_is_deterministic(live: LiveServer, direct: Any) -> None:
    client = live.ollama()
    r = client.embed(model="tinytext", input=TEXTS)
    assert r.model == "tinytext" and len(r.embeddings) == len(TEXTS)
    assert r.prompt_eval_count and r.prompt_eval_count > len(TEXTS)
    for text, got in zip(TEXTS, r.embeddings, strict=True):
        vec = np.asarray(got)
        assert vec.shape == (64,)
        assert abs(np.linalg.norm(vec) - 1.0) < 1e-6  # normalised, as Ollama's /api/embed
        assert rel_l2(vec, unit(direct(text))) <= 1e-5
    again = client.embed(model="tinytext", input=TEXTS)
    assert again.embeddings == r.embeddings  # bit-identical on a repeat
    one = client.embed(model="tinytext", input=TEXTS[1])
    assert one.embeddings == [r.embeddings[1]]  # batching does not change a vector


def test_a_dedicated_embedding_model_is_pooled_as_its_gguf_says(
    live: LiveServer, bert_path: Path
) -> None:
    import llama_cpp

    text = "two blue circles on the left"
    got = np.asarray(live.ollama().embed(model="tinybert", input=text).embeddings[0])
    cls = llama_embed(bert_path, text, llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)  # the GGUF's
    mean = llama_embed(bert_path, text, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    assert rel_l2(got, unit(cls)) <= 1e-5
    assert rel_l2(got, unit(mean)) > 1e-2  # CLS pooling, not mean
    entry = next(e for e in live.manager.loaded() if e.name == "tinybert:latest")
    assert entry.embedder.pooling == "cls" and entry.embedder.pooling_from_file
    # trained for 128 positions (llama.cpp pads its context to 256, not its micro-batch): a
    # longer input is cut to 128 tokens instead of aborting the server
    long = live.ollama().embed(model="tinybert", input="word " * 60)
    assert long.prompt_eval_count == 128 and entry.embedder.n_ctx == 128


def test_legacy_embeddings_are_not_normalised(live: LiveServer, direct: Any) -> None:
    r = live.ollama().embeddings(model="tinytext", prompt=TEXTS[0])
    vec = np.asarray(r.embedding)
    assert rel_l2(vec, direct(TEXTS[0])) <= 1e-5
    assert abs(np.linalg.norm(vec) - 1.0) > 1e-3


def test_dimensions_cut_and_renormalise(live: LiveServer) -> None:
    client = live.ollama()
    full = np.asarray(client.embed(model="tinytext", input=TEXTS[0]).embeddings[0])
    cut = np.asarray(client.embed(model="tinytext", input=TEXTS[0], dimensions=16).embeddings[0])
    assert cut.shape == (16,)
    assert rel_l2(cut, unit(full[:16])) <= 1e-6
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tinytext", input="x", dimensions=65)
    assert err.value.status_code == 400 and "64" in str(err.value)


def test_openai_embeddings_float_and_base64(live: LiveServer, direct: Any) -> None:
    client = live.openai()
    # the openai client asks for base64 by default and decodes it itself
    r = client.embeddings.create(model="tinytext", input=TEXTS[:2])
    assert [d.index for d in r.data] == [0, 1] and r.model == "tinytext"
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    floats = client.embeddings.create(model="tinytext", input=TEXTS[:2], encoding_format="float")
    for text, a, b in zip(TEXTS, r.data, floats.data, strict=False):
        assert np.allclose(a.embedding, b.embedding, rtol=0, atol=1e-7)
        assert rel_l2(np.asarray(b.embedding), unit(direct(text))) <= 1e-5
    short = client.embeddings.create(
        model="tinytext", input=TEXTS[0], dimensions=8, encoding_format="float"
    )
    assert len(short.data[0].embedding) == 8
    # token ids are accepted as input too
    entry = next(e for e in live.manager.loaded() if e.name == "tinytext:latest")
    ids = entry.embedder.tokenize(TEXTS[0])
    by_ids = client.embeddings.create(model="tinytext", input=ids, encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, floats.data[0].embedding, atol=1e-7)


def test_truncation_and_limits(live: LiveServer) -> None:
    client = live.ollama()
    long = "word " * (N_CTX * 2)
    r = client.embed(model="tinytext", input=long)
    assert r.prompt_eval_count == N_CTX and len(r.embeddings[0]) == 64
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tinytext", input=long, truncate=False)
    assert err.value.status_code == 400 and "truncate" in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tinytext", input=["a"] * 9)
    assert err.value.status_code == 400 and "at most 8" in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="nosuchmodel", input="a")
    assert err.value.status_code == 404
    bad = httpx.post(live.url + "/v1/embeddings", json={"model": "tinytext", "input": [10**9]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    empty = httpx.post(live.url + "/v1/embeddings", json={"model": "tinytext", "input": []})
    assert empty.status_code == 400


def test_empty_input_only_loads_the_model(live: LiveServer) -> None:
    client = live.ollama()
    client.generate(model="tinytext", prompt="", keep_alive=0)  # unloaded
    assert "tinytext:latest" not in live.loaded()
    r = client.embed(model="tinytext", input=[])
    assert r.embeddings == [] and "tinytext:latest" in live.loaded()
    assert client.embeddings(model="tinytext", prompt="").embedding == []


def test_an_embedding_model_does_not_chat(live: LiveServer) -> None:
    client = live.ollama()
    assert client.show("tinybert").capabilities == ["embedding"]
    assert client.show("tinytext").capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tinybert", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400 and "embedding model" in str(err.value)
    with pytest.raises(ollama.ResponseError):
        client.generate(model="tinybert", prompt="hi")
    r = httpx.post(
        live.url + "/v1/completions", json={"model": "tinybert", "prompt": "hi", "max_tokens": 2}
    )
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
