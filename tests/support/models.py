"""Real GGUF files for tests: committed fixture checkpoints converted once per session.

    from support.models import converted, fixture_dir
    model, mmproj = converted("llava15_hf")                 # f32 / f32
    model, mmproj = converted("llava15_hf", "q8_0", "f16")

Each (fixture, quant, vision_quant) is converted at most once per test session (module-level
cache) into its own temporary folder, removed when the session ends. Fixtures whose
vision tower lives outside the checkpoint (the original LLaVA layouts) get
``tests/fixtures/clip_tower``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CLIP_TOWER = FIXTURES / "clip_tower"
# fixtures in the original LLaVA layout: their CLIP tower is a separate folder
EXTERNAL_TOWER = {"llava15_orig", "bakllava_orig"}

_cache: dict[tuple[str, str, str], tuple[Path, Path]] = {}
_lock = threading.Lock()
_root: Path | None = None


def fixture_dir(fixture: str) -> Path:
    path = FIXTURES / fixture
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"test fixture {fixture!r} is missing ({path})")
    return path


def _session_root() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="mmchat-converted-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def converted(fixture: str, quant: str = "f32", vision_quant: str = "f32") -> tuple[Path, Path]:
    """(model GGUF, mmproj GGUF) of a fixture checkpoint, converted once per session.

    The files are shared by every test asking for the same combination: do not modify
    or move them (copy them first).
    """
    key = (fixture, quant, vision_quant)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0].is_file() and hit[1].is_file():
            return hit
        from mmchat.converters import convert

        src = fixture_dir(fixture)
        outdir = _session_root() / f"{fixture}-{quant}-{vision_quant}"
        result = convert(
            src,
            outdir=outdir,
            name=fixture.replace("_", "-"),
            quant=quant,
            vision_quant=vision_quant,
            vision_tower=CLIP_TOWER if fixture in EXTERNAL_TOWER else None,
        )
        _cache[key] = (result.model_path, result.mmproj_path)
        return _cache[key]
