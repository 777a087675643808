"""The default thread count follows the CPUs we may use, not llama.cpp's fixed 4."""

from __future__ import annotations

from support.models import converted

from mmchat.runtime import LoadOptions, load_model
from mmchat.runtime._llama import usable_cpus


def test_default_threads_are_the_usable_cpus() -> None:
    text, _ = converted("llava15_hf", "f32", "f32")
    model = load_model(text, None, LoadOptions(n_ctx=64))
    try:
        assert model.describe()["n_threads"] == usable_cpus()
    finally:
        model.close()


def test_explicit_threads_win() -> None:
    text, _ = converted("llava15_hf", "f32", "f32")
    model = load_model(text, None, LoadOptions(n_ctx=64, n_threads=1))
    try:
        assert model.describe()["n_threads"] == 1
    finally:
        model.close()
