"""Two GGUF files hold the same tensors (names, types, bytes) and metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_same_gguf(got_path: Path, want_path: Path) -> None:
    from gguf import GGUFReader

    want, got = GGUFReader(want_path), GGUFReader(got_path)
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors], want_path.name
    for a, b in zip(got.tensors, want.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    for key, field in want.fields.items():
        assert key in got.fields and got.fields[key].contents() == field.contents(), key
