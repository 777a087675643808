"""IDEFICS through mmchat's runtime, as a user runs it: ``load_model`` picks the
cross-attention decoder (the second text backend) for an ``idefics`` projector; the chat
template places the images; ``mmchat run`` answers about an image; the server answers through
its scheduler, one sequence or two at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from support.decoder import needs_decoder

from mmchat.runtime import LoadOptions, Message, SamplingParams
from mmchat.runtime.loader import load_model
from mmchat.vision import load_image
from mmchat.vision.synthetic import rel_l2

ROOT = Path(__file__).parent / "fixtures" / "idefics"
pytestmark = needs_decoder
OPTS = LoadOptions(n_ctx=256, n_threads=2, kv_cache_type="f32")


@cache
def converted() -> tuple[Path, Path]:
    import tempfile

    from mmchat.converters import convert

    out = Path(tempfile.mkdtemp(prefix="idefics-rt-"))
    r = convert(ROOT / "idefics_tiny", outdir=out, quant="f32", vision_quant="f32")
    return r.model_path, r.mmproj_path


def goldens() -> tuple[dict[str, Any], Any]:
    return json.loads((ROOT / "goldens.json").read_text()), np.load(ROOT / "goldens.npz")


def test_chat_path_matches_transformers() -> None:
    meta, g = goldens()
    p = meta["prompts"]["one_image"]
    with load_model(*converted(), OPTS) as lm:
        assert lm.describe()["description"].startswith("idefics")
        msgs = [
            Message(
                "user", "What is in this image?", [load_image(ROOT / "images" / "landscape.png")]
            )
        ]
        ev = lm.evaluate(msgs)
        # the template placed the image where IDEFICS was trained to see it
        image_id = meta["image_token_id"]
        assert ev.token_ids == [t for t in p["input_ids"] if t != image_id]
        assert rel_l2(ev.logits, g["prompt/one_image/logits"][-1]) < 1e-4


def test_two_turns_reuse_the_prefix_and_match_a_fresh_evaluation() -> None:
    with load_model(*converted(), OPTS) as lm:
        chat = lm.session(params=SamplingParams(temperature=0, max_tokens=4, seed=1))
        chat.ask("What is in this image?", [load_image(ROOT / "images" / "landscape.png")])
        encodes = lm.vision.encode_count
        chat.ask("And the colours?")
        st = chat.last_stats
        assert st is not None and lm.vision.encode_count == encodes
        assert st.cached_tokens > 0 and st.prompt_eval_tokens < st.prompt_tokens
        msgs = chat.messages[:-1]
        with lm.lock:
            lm.run_prompt(lm.build_prompt(msgs))
            reused = lm.logits()
        fresh = lm.evaluate(msgs)
        assert rel_l2(reused, fresh.logits) < 1e-4


def test_mmchat_run_answers_about_an_image(tmp_path: Path) -> None:
    model, mmproj = converted()
    shutil.copy(ROOT / "images" / "landscape.png", tmp_path / "photo.png")
    r = subprocess.run(
        [
            *(sys.executable, "-m", "mmchat", "run", str(model), "--mmproj", str(mmproj)),
            *("--max-tokens", "4", "--temperature", "0", "What is in this image? ./photo.png"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**__import__("os").environ, "MMCHAT_HOME": str(tmp_path / "home")},
    )
    assert r.returncode == 0, r.stderr
    assert "Added image './photo.png'" in r.stderr


def test_server_answers_one_and_two_at_once(tmp_path: Path) -> None:
    from test_serve import start_server

    from mmchat.store import Store

    model, mmproj = converted()
    store = Store(tmp_path)
    store.register("idefics", model=model, mmproj=mmproj)
    image = str(ROOT / "images" / "landscape.png")
    prompts = ["What is in this image?", "Describe it.", "Colours?", "Hello"]

    def ask(srv: Any, text: str) -> str:
        msg = {"role": "user", "content": text, "images": [image]}
        opts = {"temperature": 0, "num_predict": 6, "seed": 1}
        return srv.ollama().chat("idefics", [msg], options=opts).message.content or ""

    one = start_server(store, parallel=1, load_options=OPTS)
    try:
        alone = [ask(one, p) for p in prompts]
    finally:
        one.stop()
    two = start_server(store, parallel=2, load_options=OPTS)
    try:
        got: dict[int, str] = {}
        threads = [
            threading.Thread(target=lambda i=i: got.__setitem__(i, ask(two, prompts[i])))
            for i in range(len(prompts))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got.get(i) for i in range(len(prompts))] == alone
    finally:
        two.stop()
