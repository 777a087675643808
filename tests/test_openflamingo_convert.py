"""OpenFlamingo conversion checks that need no torch (tests/test_openflamingo.py has the rest):
the release folder is recognised by its checkpoint.pt, and without torch the converter says
in one line what is missing instead of failing halfway."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mmchat.errors import UserError

RELEASE = Path(__file__).parent / "fixtures" / "openflamingo" / "of_tiny"


def test_release_folder_is_recognised() -> None:
    from converters.families import detect_folder_family
    from converters.families.openflamingo import OpenFlamingo

    assert isinstance(detect_folder_family(RELEASE), OpenFlamingo)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None, reason="torch is installed: it converts"
)
def test_without_torch_one_clear_error(tmp_path: Path) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match=r"checkpoint\.pt is a PyTorch checkpoint.*needs torch"):
        convert(RELEASE, outdir=tmp_path, quant="f32")
    assert not list(tmp_path.glob("*.gguf"))
