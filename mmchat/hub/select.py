"""Choosing files in a GGUF repository: the text model for a quantization, and the projector.

Quantization names are compared in a normal form (upper case, no underscores, llama.cpp's
aliases applied: ``Q4_K`` is ``Q4_K_M``), so ``q4_k``, ``Q4_K_M`` and ``q_4_k`` all match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mmchat.errors import NotFoundError, UserError

DEFAULT_QUANT = "Q4_K_M"
_QUANT_TOKEN = re.compile(
    r"^(?:I?Q_?\d+(?:_?[A-Z0-9]{1,3})*|BF16|FP?16|FP?32)$",
    re.IGNORECASE,
)
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_ALIASES = {"Q4K": "Q4KM", "Q5K": "Q5KM", "Q3K": "Q3KM", "FP16": "F16", "FP32": "F32"}
# Default choice when no quant is asked for: Q4_K_M, else the closest present (similar
# size first, then larger, then smaller, full precision last).
PREFERENCE = [
    "Q4KM", "Q4KS", "Q40", "Q41", "IQ4XS", "IQ4NL", "Q5KM", "Q5KS", "Q50", "Q51", "Q6K",
    "Q3KL", "Q3KM", "Q3KS", "Q80", "IQ3M", "IQ3S", "IQ3XS", "IQ3XXS", "Q2K", "Q2KS",
    "BF16", "F16", "F32",
]  # fmt: skip
MMPROJ_PREFERENCE = ["F16", "BF16", "Q80", "F32"]


def normalize_quant(quant: str) -> str:
    q = quant.upper().replace("_", "").replace("-", "")
    return _ALIASES.get(q, q)


def quant_of(filename: str) -> str | None:
    """The quantization a GGUF file name declares (``gemma-3-4b-it-Q4_K_M.gguf`` -> Q4_K_M)."""
    stem = filename.rsplit("/", 1)[-1]
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    for token in reversed(re.split(r"[-.]", stem)):
        if _QUANT_TOKEN.match(token):
            return token
    return None


def is_mmproj(filename: str) -> bool:
    return "mmproj" in filename.rsplit("/", 1)[-1].lower()


def is_split(filename: str) -> bool:
    return bool(_SPLIT.search(filename))


@dataclass(frozen=True)
class Selection:
    model: str
    mmproj: str | None
    quant: str | None
    notes: tuple[str, ...] = ()


def _rank(quant: str | None, order: Sequence[str]) -> int:
    if quant is None:
        return len(order) + 1
    q = normalize_quant(quant)
    return order.index(q) if q in order else len(order)


def select_files(
    filenames: Iterable[str],
    *,
    repo: str,
    quant: str | None = None,
    model: str | None = None,
    mmproj: str | None = None,
    mmproj_auto: bool = True,
) -> Selection:
    """Pick the text GGUF and the projector from a repository listing.

    ``model``/``mmproj`` name files explicitly (checked to exist). Otherwise the text
    file is the one matching ``quant`` (default Q4_K_M, else the closest present).
    """
    names = sorted(filenames)
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    notes: list[str] = []
    if model is not None:
        if model not in names:
            raise NotFoundError(f"File {model!r} not found in Hugging Face repository {repo}")
        chosen = model
    else:
        texts = [n for n in ggufs if not is_mmproj(n)]
        whole = [n for n in texts if not is_split(n)]
        if not texts:
            raise NotFoundError(f"Hugging Face repository {repo} has no GGUF model file")
        if not whole:
            raise UserError(
                f"{repo} only has split GGUF files ({texts[0]} ...), which mmchat cannot pull yet"
            )
        if quant is not None:
            want = normalize_quant(quant)
            matches = [n for n in whole if (q := quant_of(n)) and normalize_quant(q) == want]
            if not matches:
                present = sorted({q for n in whole if (q := quant_of(n))})
                raise NotFoundError(
                    f"No {quant.upper()} GGUF in {repo}; available: "
                    + (", ".join(present) if present else ", ".join(whole))
                )
        else:
            best = min(_rank(quant_of(n), PREFERENCE) for n in whole)
            matches = [n for n in whole if _rank(quant_of(n), PREFERENCE) == best]
            q = quant_of(matches[0])
            if q is None or normalize_quant(q) != normalize_quant(DEFAULT_QUANT):
                notes.append(f"{DEFAULT_QUANT} is not in {repo}; using {q or matches[0]}")
        if len(matches) > 1:
            notes.append(f"several files match, using {matches[0]} (others: {matches[1:]})")
        chosen = matches[0]
    projector: str | None = None
    if mmproj is not None:
        if mmproj not in names:
            raise NotFoundError(f"File {mmproj!r} not found in Hugging Face repository {repo}")
        projector = mmproj
    elif mmproj_auto:
        candidates = [n for n in ggufs if is_mmproj(n)]
        if candidates:
            projector = min(candidates, key=lambda n: (_rank(quant_of(n), MMPROJ_PREFERENCE), n))
        else:
            notes.append(f"{repo} has no mmproj file: the model will be text-only")
    return Selection(model=chosen, mmproj=projector, quant=quant_of(chosen), notes=tuple(notes))
