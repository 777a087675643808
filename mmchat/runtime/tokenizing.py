"""Tokenizing a rendered prompt the way the checkpoint's own tokenizer would.

``PromptTokenizer`` turns the pieces of a rendered chat template (text, and the image slots
between them) into token ids: BOS when the model wants one (unless the text starts with it),
special tokens parsed, and the model's rule for text that follows a special token or an
image (``legacy_spaces``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmchat.runtime import _llama
from mmchat.runtime.template import ChatTemplate, ImageSlot


class PromptTokenizer:
    def __init__(
        self,
        text: _llama.TextModel,
        template: ChatTemplate,
        legacy_spaces: bool,
        space_after_media: bool | None = None,
    ) -> None:
        self.text = text
        self.template = template
        self.legacy_spaces = legacy_spaces
        self.space_after_media = legacy_spaces if space_after_media is None else space_after_media
        """Whether the text right after an image starts with SentencePiece's "▁" when that
        differs from the rule after special tokens: original LLaVA tokenizes chunk by chunk
        around the image (always "▁" there) with a ``legacy=false`` tokenizer (no "▁" after
        ``</s>`` inside a chunk)."""
        """How text that follows a special token (``</s>``, ``<image>``) or an image is
        tokenized. True: as a fragment of its own, with SentencePiece's dummy-prefix "▁"
        (transformers' ``legacy=True`` tokenizers, original LLaVA's ``tokenizer_image_token``,
        llama.cpp's own tokenizer and mtmd). False: as the continuation of the prompt, no
        "▁" (transformers' ``legacy=False`` tokenizers, e.g. the llava-hf checkpoints); only
        the very start of the prompt gets the dummy prefix."""
        self._special: re.Pattern[str] | None = None
        self._special_ids: dict[str, int] = {}

    def _special_split(self, text: str) -> list[tuple[str, int | None]]:
        """``text`` cut into (fragment, None) and (special token text, id) pieces, as
        llama.cpp's ``parse_special`` would cut it (control, user-defined, unknown tokens)."""
        if self._special is None:
            self._special_ids = self.text.special_tokens()
            names = sorted(self._special_ids, key=len, reverse=True)
            self._special = re.compile("|".join(re.escape(n) for n in names) or r"(?!x)x")
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self._special.finditer(text):
            if m.start() > pos:
                out.append((text[pos : m.start()], None))
            out.append((m.group(0), self._special_ids[m.group(0)]))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def _tokenize_continuation(self, text: str) -> list[int]:
        """Tokens of ``text`` as the continuation of a prompt: no SentencePiece dummy prefix.

        llama.cpp prepends "▁" to every separately tokenized fragment of an SPM vocabulary
        that asks for it. To get the continuation form, tokenize a probe character plus the
        text and strip the probe's tokens; the result is checked by detokenizing it.
        """
        plain = self.text.tokenize(text, add_special=False, parse_special=False)
        if not text or self.text.detokenize(plain) == text:
            return plain  # no dummy prefix in this vocabulary
        for probe in ("\n", "\x01", "#"):
            head = self.text.tokenize(probe, add_special=False, parse_special=False)
            ids = self.text.tokenize(probe + text, add_special=False, parse_special=False)
            if ids[: len(head)] != head:
                continue
            rest = ids[len(head) :]
            if self.text.detokenize(rest) == text:
                return rest
        return plain

    def _tokenize_piece(
        self, piece: str, *, at_start: bool, after_media: bool = False
    ) -> list[int]:
        bos_text = self.template.bos_token
        add_bos = at_start and self.text.add_bos and not (bos_text and piece.startswith(bos_text))
        if self.legacy_spaces and (not after_media or self.space_after_media):
            return self.text.tokenize(piece, add_special=add_bos)
        out = [self.text.bos] if add_bos else []
        offset = 0
        fresh = at_start or (after_media and self.space_after_media)
        for frag, special_id in self._special_split(piece):
            if special_id is not None:
                out.append(special_id)
            elif fresh and offset == 0:
                out.extend(self.text.tokenize(frag, add_special=False, parse_special=False))
            else:
                out.extend(self._tokenize_continuation(frag))
            offset += len(frag)
        return out

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokenize a whole prompt string as the checkpoint's own tokenizer would: BOS when
        the model wants one (unless the text starts with it), special tokens parsed, and the
        model's rule for the text after special tokens (``legacy_spaces``)."""
        return self._tokenize_piece(text, at_start=True)

    def tokenize_pieces(self, pieces: Sequence[str | ImageSlot]) -> list[list[int] | ImageSlot]:
        out: list[list[int] | ImageSlot] = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, ImageSlot):
                out.append(piece)
            else:
                after = i > 0 and isinstance(pieces[i - 1], ImageSlot)
                out.append(self._tokenize_piece(piece, at_start=(i == 0), after_media=after))
        if pieces and isinstance(pieces[0], ImageSlot) and self.text.add_bos:
            out.insert(0, [self.text.bos])  # a prompt that starts with an image
        return out
