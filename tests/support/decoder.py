"""Whether libmmvision's cross-attention decoder can be loaded, for the tests that need it."""

from __future__ import annotations

import pytest


def _decoder_available() -> str | None:
    from mmchat.native.library import NativeUnavailableError

    try:
        from mmchat.native.decoder import decoder_library

        decoder_library()
    except NativeUnavailableError as exc:
        return str(exc)
    return None


NO_DECODER = _decoder_available()
"""Why the decoder cannot be used, or None."""
needs_decoder = pytest.mark.skipif(
    NO_DECODER is not None, reason=f"no native decoder: {NO_DECODER}"
)
