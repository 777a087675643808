"""The official JavaScript clients (``ollama`` and ``openai`` from npm) against
``mmchat serve``, run by Node: list, chat (whole and streamed), generate, embed, and
OpenAI's models, chat completions, embeddings (base64 by default in that client) and text
completions. Their answers must equal the Python clients'.

Slow (npm downloads the two packages into a temporary folder); skipped with the reason
when Node/npm are missing or the npm registry cannot be reached.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_serve import LiveServer, make_store, start_server

pytestmark = pytest.mark.slow

OPTIONS = {"temperature": 0, "seed": 7, "num_predict": 6}
TEXTS = ["a red circle", "x"]

SCRIPT = r"""
import { Ollama } from 'ollama';
import OpenAI from 'openai';

const url = process.argv[2];
const options = JSON.parse(process.argv[3]);
const texts = JSON.parse(process.argv[4]);
const out = {};
const o = new Ollama({ host: url });
const messages = [{ role: 'user', content: 'hi' }];
out.models = (await o.list()).models.map((m) => m.model);
out.chat = (await o.chat({ model: 'tinytext', messages, options })).message.content;
let streamed = '';
for await (const part of await o.chat({ model: 'tinytext', messages, options, stream: true })) {
  streamed += part.message.content;
}
out.chat_stream = streamed;
out.generate = (await o.generate({ model: 'tinytext', prompt: 'hi', options })).response;
out.embed = (await o.embed({ model: 'tinytext', input: texts })).embeddings;

const ai = new OpenAI({ baseURL: url + '/v1', apiKey: 'unused', maxRetries: 0 });
const sampling = { temperature: 0, seed: 7, max_tokens: options.num_predict };
out.oa_models = (await ai.models.list()).data.map((m) => m.id);
out.oa_chat = (await ai.chat.completions.create({ model: 'tinytext', messages, ...sampling }))
  .choices[0].message.content;
out.oa_embed = (await ai.embeddings.create({ model: 'tinytext', input: texts })).data.map(
  (d) => d.embedding,
);
out.oa_completion = (await ai.completions.create({ model: 'tinytext', prompt: 'hi', ...sampling }))
  .choices[0].text;
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def js_clients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are not installed")
    folder = tmp_path_factory.mktemp("js-clients")
    (folder / "package.json").write_text('{"name": "mmchat-js-test", "type": "module"}')
    try:
        proc = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "ollama", "openai"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install ollama openai took more than 5 minutes (registry unreachable?)")
    if proc.returncode != 0:
        pytest.skip(f"npm install ollama openai failed (no registry?): {proc.stderr[-300:]}")
    (folder / "run.mjs").write_text(SCRIPT)
    return folder


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(make_store(tmp_path_factory.mktemp("serve-js")))
    yield srv
    srv.stop()


def test_js_clients_get_what_the_python_clients_get(js_clients: Path, live: LiveServer) -> None:
    proc = subprocess.run(
        ["node", "run.mjs", live.url, json.dumps(OPTIONS), json.dumps(TEXTS)],
        cwd=js_clients,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    client = live.ollama()
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat(model="tinytext", messages=messages, options=OPTIONS).message.content
    assert {"tiny:latest", "tinytext:latest"} <= set(got["models"])
    assert got["chat"] == got["chat_stream"] == chat
    assert (
        got["generate"] == client.generate(model="tinytext", prompt="hi", options=OPTIONS).response
    )
    ref = np.asarray(client.embed(model="tinytext", input=TEXTS).embeddings)
    assert np.allclose(np.asarray(got["embed"]), ref, rtol=0, atol=1e-7)
    assert np.allclose(np.asarray(got["oa_embed"]), ref, rtol=0, atol=1e-7)

    ai = live.openai()
    assert set(got["oa_models"]) == {m.id for m in ai.models.list().data}
    sampling = {"temperature": 0, "seed": 7, "max_tokens": OPTIONS["num_predict"]}
    oa_chat = ai.chat.completions.create(model="tinytext", messages=messages, **sampling)
    assert got["oa_chat"] == oa_chat.choices[0].message.content
    completion = ai.completions.create(model="tinytext", prompt="hi", **sampling)
    assert got["oa_completion"] == completion.choices[0].text
