"""BERT's WordPiece tokenizer (bert-base-uncased style), in pure Python: the one place that
reads such a vocabulary (the converter, from a checkpoint's tokenizer folder) and runs it (the
InstructBLIP engine, from the vision GGUF), so both agree with transformers' BertTokenizer.

Steps, as ``BertTokenizer`` (``BasicTokenizer`` then ``WordpieceTokenizer``) does them:
clean the text (drop NUL, U+FFFD and control characters, whitespace -> " "), put spaces
around CJK ideographs, split on whitespace; with ``do_lower_case``: lower-case and strip
accents (NFD, drop combining marks); split off every punctuation character; then per word
greedy longest-match-first against the vocabulary with "##" continuations (a word longer
than 100 characters or with no match is ``[UNK]``). Special tokens in the text are not
parsed (InstructBLIP feeds plain instructions). The encoding is ``[CLS] ... [SEP]``; longer
than ``max_length`` keeps the end (``truncation_side="left"``, as LAVIS/HF configure it).
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from mmchat.errors import CorruptFileError

MAX_WORD_CHARS = 100


def _is_whitespace(ch: str) -> bool:
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


@dataclass
class WordPiece:
    """A WordPiece vocabulary (token i = ``tokens[i]``) and its special tokens."""

    tokens: list[str]
    do_lower_case: bool = True
    unk: str = "[UNK]"
    cls: str = "[CLS]"
    sep: str = "[SEP]"
    pad: str = "[PAD]"
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {}
        for i, t in enumerate(self.tokens):
            self._index.setdefault(t, i)
        for name in (self.unk, self.cls, self.sep):
            if name not in self._index:
                raise CorruptFileError(f"the WordPiece vocabulary has no {name} token")

    def id_of(self, token: str) -> int:
        return self._index[token]

    def _basic(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_cjk(cp):
                out.append(f" {ch} ")
            elif _is_whitespace(ch):
                out.append(" ")
            else:
                out.append(ch)
        words: list[str] = []
        for word in "".join(out).split():
            if self.do_lower_case:
                word = word.lower()
                word = "".join(
                    c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn"
                )
            cur = ""
            for ch in word:
                if _is_punctuation(ch):
                    if cur:
                        words.append(cur)
                        cur = ""
                    words.append(ch)
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > MAX_WORD_CHARS:
            return [self._index[self.unk]]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._index:
                    found = self._index[piece]
                    break
                end -= 1
            if found is None:
                return [self._index[self.unk]]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str, *, max_length: int | None = None) -> list[int]:
        """``[CLS] pieces [SEP]``; over ``max_length`` ids the pieces' end is kept."""
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        if max_length is not None and len(ids) + 2 > max_length:
            keep = max(0, max_length - 2)
            ids = ids[len(ids) - keep :] if keep else []
        return [self._index[self.cls], *ids, self._index[self.sep]]


def read_wordpiece_folder(folder: Path) -> WordPiece:
    """A tokenizer folder (``vocab.txt`` and/or ``tokenizer.json``, ``tokenizer_config.json``,
    ``added_tokens.json``) -> WordPiece, added tokens (``[DEC]``) placed at their ids."""
    tokens: list[str] = []
    vocab_txt = folder / "vocab.txt"
    tj_path = folder / "tokenizer.json"
    tj: dict = {}
    if tj_path.is_file():
        try:
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"{tj_path} is not valid JSON: {exc}") from exc
    if vocab_txt.is_file():
        tokens = vocab_txt.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
    elif isinstance(tj.get("model"), dict) and tj["model"].get("type") == "WordPiece":
        vocab = tj["model"].get("vocab") or {}
        tokens = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for t, i in vocab.items():
            tokens[int(i)] = t
    else:
        raise CorruptFileError(f"{folder} holds no WordPiece vocabulary (vocab.txt)")
    added: dict[str, int] = {}
    for entry in tj.get("added_tokens", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), int):
            added[str(entry.get("content"))] = entry["id"]
    at = folder / "added_tokens.json"
    if at.is_file():
        try:
            added.update({k: int(v) for k, v in json.loads(at.read_text()).items()})
        except (OSError, ValueError, TypeError) as exc:
            raise CorruptFileError(f"{at} is not valid: {exc}") from exc
    for text, i in sorted(added.items(), key=lambda kv: kv[1]):
        while len(tokens) <= i:
            tokens.append(f"[unused-{len(tokens)}]")
        tokens[i] = text
    lower = True
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            lower = bool(cfg.get("do_lower_case", True))
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"{cfg_path} is not valid JSON: {exc}") from exc
    return WordPiece(tokens, do_lower_case=lower)
