"""The SentencePiece ("llama") vocabulary, special tokens and chat template of a checkpoint.

``tokenizer.model`` is a protobuf ``ModelProto``; the few fields needed (pieces with score
and type, the trainer's special ids) are decoded here directly, so no sentencepiece or
protobuf package is needed at run time. A checkpoint without ``tokenizer.model`` but with a
byte-fallback BPE ``tokenizer.json`` converted from SentencePiece (what transformers writes
for Llama/Mistral) is read from that file instead; its merge order equals its id order, so
the score of a normal piece is minus its id, which gives SentencePiece the same merges.

Token types follow llama.cpp's numbering (gguf ``TokenType``): 1 normal, 2 unknown,
3 control, 4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmchat.errors import CorruptFileError, UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    chat_template: str | None = None
    template_source: str = "none"  # "checkpoint" or "family default"
    notes: list[str] = field(default_factory=list)
    # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE, with a
    # tokenizer.ggml.pre name and merges)
    model: str = "llama"
    pre: str | None = None
    merges: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


# --- a minimal protobuf reader ---------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field of one message."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        val: Any
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val = buf[pos : pos + 8]
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val = buf[pos : pos + n]
            if len(val) != n:
                raise ValueError("truncated field")
            pos += n
        elif wt == 5:
            val = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        out.append((num, wt, val))
    if pos != len(buf):
        raise ValueError("truncated message")
    return out


def _int32(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class SentencePieceModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1


def read_sentencepiece(path: Path) -> SentencePieceModel:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    sp = SentencePieceModel(pieces, scores, types)
    try:
        for num, wt, val in _fields(data):
            if num == 1 and wt == 2:
                piece, score, typ = "", 0.0, NORMAL
                for n2, w2, v2 in _fields(val):
                    if n2 == 1 and w2 == 2:
                        piece = v2.decode("utf-8")
                    elif n2 == 2 and w2 == 5:
                        (score,) = struct.unpack("<f", v2)
                    elif n2 == 3 and w2 == 0:
                        typ = int(v2)
                pieces.append(piece)
                scores.append(float(score))
                types.append(typ)
            elif num == 2 and wt == 2:  # TrainerSpec
                for n2, w2, v2 in _fields(val):
                    if w2 != 0:
                        continue
                    if n2 == 40:
                        sp.unk_id = _int32(v2)
                    elif n2 == 41:
                        sp.bos_id = _int32(v2)
                    elif n2 == 42:
                        sp.eos_id = _int32(v2)
                    elif n2 == 43:
                        sp.pad_id = _int32(v2)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not a valid SentencePiece model: {exc}") from exc
    if not pieces:
        raise CorruptFileError(f"{path} is not a SentencePiece model (it holds no pieces)")
    if not 1 <= min(types) <= max(types) <= 6:
        raise CorruptFileError(f"{path} has pieces of an unknown type")
    return sp


@dataclass
class SentencePieceNormalizer:
    """What a SentencePiece model says about its algorithm and text normalisation (what
    llama.cpp's Unigram ("t5") tokenizer needs besides the pieces)."""

    unigram: bool
    """TrainerSpec.model_type is UNIGRAM (1; the default); False for BPE (2) and others."""
    precompiled_charsmap: bytes
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def read_sentencepiece_normalizer(path: Path) -> SentencePieceNormalizer:
    """``trainer_spec.model_type`` and ``normalizer_spec`` (precompiled charsmap, dummy
    prefix, extra-whitespace removal) of a SentencePiece ``ModelProto``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    out = SentencePieceNormalizer(unigram=True, precompiled_charsmap=b"")
    try:
        for num, wt, val in _fields(data):
            if num == 2 and wt == 2:  # TrainerSpec.model_type (field 3)
                for n2, w2, v2 in _fields(val):
                    if n2 == 3 and w2 == 0:
                        out.unigram = int(v2) == 1
            elif num == 3 and wt == 2:  # NormalizerSpec
                for n2, w2, v2 in _fields(val):
                    if n2 == 2 and w2 == 2:
                        out.precompiled_charsmap = bytes(v2)
                    elif n2 == 3 and w2 == 0:
                        out.add_dummy_prefix = bool(v2)
                    elif n2 == 4 and w2 == 0:
                        out.remove_extra_whitespaces = bool(v2)
    except ValueError as exc:
        raise CorruptFileError(f"{path} is not a valid SentencePiece model: {exc}") from exc
    return out


def _unigram_of_tokenizer_json(tj: dict[str, Any], path: Path) -> SentencePieceModel:
    """A ``Unigram`` tokenizer.json (T5's, as transformers 5 saves it without spiece.model):
    pieces with their scores; ``<unk>`` unknown, the special added tokens control."""
    try:
        entries = [(str(p), float(sc)) for p, sc in tj["model"]["vocab"]]
        unk_id = int(tj["model"].get("unk_id", 0) or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{path} is not a valid Unigram tokenizer.json: {exc}") from exc
    specials = {
        t.get("id") for t in tj.get("added_tokens", []) if isinstance(t, dict) and t.get("special")
    }
    types = [CONTROL if i in specials else NORMAL for i in range(len(entries))]
    if 0 <= unk_id < len(types):
        types[unk_id] = UNKNOWN
    sp = SentencePieceModel([p for p, _ in entries], [sc for _, sc in entries], types)
    sp.unk_id, sp.bos_id, sp.eos_id = unk_id, -1, -1
    return sp


def unigram_normalizer_of_tokenizer_json(path: Path) -> SentencePieceNormalizer:
    """The ``SentencePieceNormalizer`` a ``Unigram`` tokenizer.json implies: its
    ``Precompiled`` charsmap, a dummy prefix when its Metaspace prepends "▁", and extra
    whitespace removed when it splits on whitespace (T5's WhitespaceSplit)."""
    import base64

    tj = _read_json(path)
    if (tj.get("model") or {}).get("type") != "Unigram":
        return SentencePieceNormalizer(unigram=False, precompiled_charsmap=b"")
    charsmap = b""
    for norm in _walk(tj.get("normalizer"), "normalizers"):
        if norm.get("type") == "Precompiled" and norm.get("precompiled_charsmap"):
            charsmap = base64.b64decode(str(norm["precompiled_charsmap"]))
    pres = _walk(tj.get("pre_tokenizer"), "pretokenizers")
    prefix, _ = prefix_rule_of_tokenizer_json(tj)
    return SentencePieceNormalizer(
        unigram=True,
        precompiled_charsmap=charsmap,
        add_dummy_prefix=prefix is not False,
        remove_extra_whitespaces=any(p.get("type") == "WhitespaceSplit" for p in pres),
    )


def _from_tokenizer_json(path: Path) -> SentencePieceModel:
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
        if model.get("type") == "Unigram":
            return _unigram_of_tokenizer_json(tj, path)
        vocab: dict[str, int] = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{path} is not a valid tokenizer.json: {exc}") from exc
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UserError(
            f"{path.parent} has no tokenizer.model and its tokenizer.json is not a "
            "SentencePiece-style (byte-fallback BPE) vocabulary; it cannot be converted to "
            "a llama vocabulary"
        )
    n = max(vocab.values()) + 1
    pieces = [""] * n
    for piece, i in vocab.items():
        pieces[i] = piece
    scores = [0.0] * n
    types = [NORMAL] * n
    byte_re = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
    specials = {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}
    unk = model.get("unk_token")
    sp = SentencePieceModel(pieces, scores, types)
    for i, p in enumerate(pieces):
        if p == unk:
            types[i] = UNKNOWN
            sp.unk_id = i
        elif p in specials:
            types[i] = CONTROL
        elif byte_re.match(p):
            types[i] = BYTE
        else:
            scores[i] = -float(i)
    return sp


# --- assembling the vocabulary -----------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _content(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return str(tok["content"])
    return None


_GENERATION_TAGS = re.compile(r"\{%-?\s*(generation|endgeneration)\s*-?%\}")


def clean_template(template: str) -> str:
    """Drop transformers-only ``{% generation %}`` markers (no-ops for rendering)."""
    return _GENERATION_TAGS.sub("", template)


def find_chat_template(folders: list[Path]) -> str | None:
    """The checkpoint's own chat template, if it ships one."""
    for folder in folders:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return clean_template(jinja.read_text(encoding="utf-8"))
        for name in ("tokenizer_config.json", "chat_template.json", "processor_config.json"):
            tmpl = _read_json(folder / name).get("chat_template")
            if isinstance(tmpl, str) and tmpl.strip():
                return clean_template(tmpl)
            if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
                for entry in tmpl:
                    if isinstance(entry, dict) and entry.get("name") == "default":
                        return clean_template(str(entry.get("template", "")))
    return None


def load_vocab(
    folder: Path,
    *,
    vocab_size: int,
    config_ids: dict[str, int | None],
    default_template: str,
) -> Vocab:
    """Read the tokenizer files in ``folder`` into a vocabulary of exactly ``vocab_size``.

    ``config_ids`` are the model config's ``bos/eos/pad_token_id`` (used when the tokenizer
    files do not name the special tokens).
    """
    spm_path = folder / "tokenizer.model"
    if not spm_path.is_file() and (folder / "spiece.model").is_file():
        spm_path = folder / "spiece.model"  # T5's name for it
    tj_path = folder / "tokenizer.json"
    if spm_path.is_file():
        sp = read_sentencepiece(spm_path)
        source = spm_path.name
    elif tj_path.is_file():
        sp = _from_tokenizer_json(tj_path)
        source = "tokenizer.json"
    else:
        raise UserError(
            f"No tokenizer in {folder}: expected tokenizer.model (SentencePiece) or tokenizer.json"
        )
    if len(sp.pieces) > vocab_size:
        raise UserError(
            f"The tokenizer ({source}) has {len(sp.pieces)} pieces but the model's "
            f"vocabulary has only {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i, (piece, score, typ) in enumerate(zip(sp.pieces, sp.scores, sp.types, strict=True)):
        tokens[i], scores[i], types[i] = piece, score, typ

    notes: list[str] = []
    tcfg = _read_json(folder / "tokenizer_config.json")

    def place(tid: int, text: str, special: bool) -> None:
        if not 0 <= tid < vocab_size:
            notes.append(f"added token {text!r} (id {tid}) is outside the vocabulary; skipped")
            return
        if types[tid] in (UNKNOWN, CONTROL) and tokens[tid] == text:
            return  # <unk>, <s>, </s> already right
        if special or re.fullmatch(r"<\|.*\|>", text):
            types[tid] = CONTROL
        else:
            types[tid] = USER_DEFINED
            text = text.replace("\u2581", " ")
        tokens[tid] = text
        scores[tid] = -1000.0

    for text, tid in _read_json(folder / "added_tokens.json").items():
        if isinstance(tid, int):
            place(tid, text, False)
    added = tcfg.get("added_tokens_decoder")
    if isinstance(added, dict):
        for key, data in added.items():
            content = _content(data)
            if content is not None and str(key).isdigit():
                place(int(key), content, bool(isinstance(data, dict) and data.get("special")))
    if tj_path.is_file():
        # added tokens past the base vocabulary (<image>, <pad>): a folder transformers 5
        # saved lists them only here (no added_tokens.json, no added_tokens_decoder)
        tj = _read_json(tj_path)
        for entry in tj.get("added_tokens", []) or []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), int):
                content = _content(entry)
                if content is not None and entry["id"] >= len(sp.pieces):
                    place(entry["id"], content, bool(entry.get("special")))

    index: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        index.setdefault(tok, i)
    stmap = _read_json(folder / "special_tokens_map.json")

    def special_id(kind: str, fallback: int | None) -> int | None:
        for src in (tcfg, stmap):
            text = _content(src.get(f"{kind}_token"))
            if text is not None and text in index:
                return index[text]
        cid = config_ids.get(f"{kind}_token_id")
        if isinstance(cid, int) and 0 <= cid < vocab_size:
            return cid
        if fallback is not None and 0 <= fallback < vocab_size:
            return fallback
        return None

    vocab = Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=special_id("bos", sp.bos_id),
        eos_id=special_id("eos", sp.eos_id),
        unk_id=special_id("unk", sp.unk_id),
        pad_id=special_id("pad", sp.pad_id),
        add_bos=bool(tcfg.get("add_bos_token", True)),
        add_eos=bool(tcfg.get("add_eos_token", False)),
        notes=notes,
    )
    own = find_chat_template([folder])
    if own:
        vocab.chat_template, vocab.template_source = own, "checkpoint"
    else:
        vocab.chat_template, vocab.template_source = default_template, "family default"
    return vocab


# --- the space after a special token ------------------------------------------------------

SPIECE = "\u2581"


def _walk(node: Any, key: str) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer and, for a ``Sequence``, its members (flattened)."""
    if not isinstance(node, dict):
        return []
    members = node.get(key)
    if node.get("type") == "Sequence" and isinstance(members, list):
        return [n for m in members for n in _walk(m, key)]
    return [node]


def prefix_rule_of_tokenizer_json(tj: dict[str, Any]) -> tuple[bool | None, str]:
    """How a ``tokenizer.json`` pipeline starts each piece of text between special tokens.

    (legacy_spaces, why): True when every piece gets SentencePiece's dummy "▁" (a
    ``Prepend("▁")`` normalizer, which ``tokenizers`` applies to each piece; or a
    ``Metaspace`` pre-tokenizer with ``prepend_scheme: "always"`` / the pre-0.14 spelling
    ``add_prefix_space: true``); False when only the very first piece does
    (``prepend_scheme: "first"``) or none does (``"never"``); None when the file has no such
    step (not a SentencePiece-style pipeline)."""
    for norm in _walk(tj.get("normalizer"), "normalizers"):
        if norm.get("type") == "Prepend" and norm.get("prepend") == SPIECE:
            return True, 'tokenizer.json normalizer Prepend("\u2581")'
    for pre in _walk(tj.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") != "Metaspace":
            continue
        scheme = pre.get("prepend_scheme")
        if scheme is None and isinstance(pre.get("add_prefix_space"), bool):
            scheme = "always" if pre["add_prefix_space"] else "never"
        if scheme in ("always", "first", "never"):
            return scheme == "always", f"tokenizer.json Metaspace prepend_scheme {scheme!r}"
    return None, ""


def legacy_spaces_of(folder: Path) -> tuple[bool, list[str]]:
    """Whether the checkpoint's Hugging Face tokenizer, tokenizing a whole prompt, starts
    the text after a special token (``<image>``, ``</s>``) with "▁" (True, "legacy") or
    continues it without one (False). Returns (value, conversion notes).

    1. ``tokenizer.json``, when its pipeline says (see ``prefix_rule_of_tokenizer_json``):
       the fast tokenizer, which transformers 4 runs as written and which every
       ``save_pretrained`` writes to agree with the tokenizer it saved;
    2. otherwise the ``legacy`` key of ``tokenizer_config.json``;
    3. otherwise False: transformers 5's ``LlamaTokenizer`` default. (transformers 4
       defaulted to True here, with a warning.)

    transformers 5's ``LlamaTokenizer`` ignores the pipeline in ``tokenizer.json`` and follows
    ``legacy`` alone (missing = False); where the two disagree a note says so (measured with
    transformers 4.57 and 5.23, tests/test_tokenizer_legacy.py)."""
    cfg = _read_json(folder / "tokenizer_config.json")
    raw = cfg.get("legacy")
    flag = raw if isinstance(raw, bool) else None
    notes: list[str] = []
    tj_path = folder / "tokenizer.json"
    from_file: bool | None = None
    why = ""
    if tj_path.is_file():
        from_file, why = prefix_rule_of_tokenizer_json(_read_json(tj_path))

    def said(v: bool) -> str:
        return "a \u2581 after special tokens" if v else "no \u2581 after special tokens"

    if from_file is not None:
        if "'never'" in why:
            notes.append(
                f"tokenizer: {why}: this tokenizer adds no dummy \u2581 even at the start of "
                "a prompt; mmchat's runtime adds one there (SentencePiece's rule)"
            )
        v5 = bool(flag)  # transformers 5: the flag, missing = False
        if v5 != from_file:
            legacy_text = "missing" if flag is None else f"{flag}"
            notes.append(
                f"tokenizer: {why} gives {said(from_file)} (transformers 4's fast tokenizer, "
                f"used here), but tokenizer_config.json's legacy is {legacy_text}, from which "
                f"transformers 5 gives {said(v5)}"
            )
        return from_file, notes
    if flag is not None:
        return flag, notes
    notes.append(
        "tokenizer: no tokenizer.json and no legacy key: no \u2581 after special tokens "
        "(transformers 5's default; transformers 4 defaulted to legacy=True)"
    )
    return False, notes


# The conversation format LLaVA 1.5 and BakLLaVA-1 were trained with (vicuna_v1):
# "<system> USER: <image>\n<question> ASSISTANT: <answer></s>USER: ... ASSISTANT:".
# Content may be a string or a list of {"type": "image"|"text"} parts (images first).
LLAVA_V1_TEMPLATE = (
    '{%- set system = "A chat between a curious human and an artificial intelligence '
    "assistant. The assistant gives helpful, detailed, and polite answers to the human's "
    'questions." -%}'
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + ('<image>\\n' * n_images) + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
