"""Hugging Face checkpoint -> GGUF conversion (installed as ``mmchat.converters``).

Public API::

    from mmchat.converters import convert
    result = convert("llava-hf/llava-1.5-7b-hf", outdir=Path("out"), quant="q4_k_m")
    result.model_path, result.mmproj_path, result.name

Layout: ``checkpoint`` (safetensors/.bin readers), ``tokenizer`` (SentencePiece vocab,
special tokens, chat template), ``families/`` (one module per model family), ``quant``
(type names, llama.cpp's per-tensor policy, ggml's quantizers), ``convert`` (one-pass GGUF
writing, atomic output), ``source`` (local folder or Hugging Face download).
"""

from __future__ import annotations

from .families import supported_architectures
from .pipeline import ConversionResult, PartSummary, convert
from .quant import TEXT_QUANTS, VISION_QUANTS

__all__ = [
    "TEXT_QUANTS",
    "VISION_QUANTS",
    "ConversionResult",
    "PartSummary",
    "convert",
    "supported_architectures",
]
