"""NeVA's conversation formats as chat templates (NeMo's ``neva/conversation.py`` and the
``preprocess_*`` functions NeMo's inference runs through ``neva_process_prompts``), and where
its tokenizer comes from.

NeMo tokenizes the whole prompt with ``text_to_ids`` (no BOS added), after turning each
``<image>`` into ``<image>\\n`` and then into the image span: ``<extra_id_4>`` +
``<extra_id_3>`` x (N-2) + ``<extra_id_5>`` (all N rows replaced by the image's N embedding
rows), or, with ``use_im_start_end``, ``<extra_id_4>`` + ``<extra_id_3>`` x N +
``<extra_id_5>`` (only the N patch rows replaced). The templates below write ``<image>``
where the rows go (mmchat's runtime puts the rows there) and the start/end tokens around it
when they stay text.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from mmchat.errors import CorruptFileError, UserError

NVGPT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.\n\n"
)
NVGPT_LABEL = (
    "<extra_id_2>quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,"
    "coherence:4,complexity:4,verbosity:4\n"
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

# message text and image count, whether content is a string or typed parts
_CONTENT = (
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
)


def _js(s: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _system(default: str) -> str:
    return (
        f"{{%- set system = {_js(default)} -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}"
        "{%- set messages = messages[1:] -%}"
        "{%- endif -%}"
    )


def _nvgpt(image: str, system: str) -> str:
    # <extra_id_0>System\n{system}<extra_id_1>User\n{user}\n<extra_id_1>Assistant\n
    # <extra_id_2>{label}\n{answer}\n<extra_id_1>User\n ... Assistant\n<extra_id_2>{label}\n
    return (
        _system(system) + "{{- '<extra_id_0>System\\n' + system + '<extra_id_1>' -}}"
        "{%- for message in messages -%}" + _CONTENT + "{%- if message['role'] == 'user' -%}"
        f"{{{{- 'User\\n' + ({_js(image + chr(10))} * n_images) + text + '\\n<extra_id_1>' -}}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- 'Assistant\\n' + {_js(NVGPT_LABEL)} + text + '\\n<extra_id_1>' -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        f"{{{{- 'Assistant\\n' + {_js(NVGPT_LABEL)} -}}}}"
        "{%- endif -%}"
    )


def _llama_2(image: str) -> str:
    # " [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s> [INST] ..."
    # (NeMo writes <extra_id_6>/<extra_id_7> and swaps in the ids of <s>/</s>; the leading
    # <extra_id_6> is stripped, so the prompt starts with " [INST]" and no BOS)
    return (
        _system(LLAVA_LLAMA_2_SYSTEM)
        + "{%- for message in messages -%}"
        + _CONTENT
        + "{%- if message['role'] == 'user' -%}"
        "{%- if not loop.first -%}{{- '<s>' -}}{%- endif -%}"
        "{%- set text = (image_text * n_images) + text -%}"
        "{%- if loop.first -%}"
        "{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text -%}"
        "{%- endif -%}"
        "{{- ' [INST] ' + text + ' [/INST]' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- ' ' + text + ' </s>' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ).replace("image_text", _js(image + "\n"))


def _vicuna_v1(image: str) -> str:
    # "{system} USER: {user} ASSISTANT: {answer}</s> USER: ... ASSISTANT:" (NeMo's sep2 is
    # <extra_id_7>, swapped for </s>; a space after it when a turn follows)
    return (
        _system(VICUNA_V1_SYSTEM) + "{{- system + ' ' -}}"
        "{%- for message in messages -%}" + _CONTENT + "{%- if message['role'] == 'user' -%}"
        f"{{{{- 'USER: ' + ({_js(image + chr(10))} * n_images) + text + ' ' -}}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- 'ASSISTANT: ' + text + '</s>' -}}{%- if not loop.last -%}{{- ' ' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def _llama_3(image: str) -> str:
    # "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    # "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
    # "<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>" ...
    return (
        _system(LLAVA_LLAMA_2_SYSTEM)
        + "{{- '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n' + system"
        " + '<|eot_id|>' -}}"
        "{%- for message in messages -%}" + _CONTENT + "{%- if message['role'] == 'user' -%}"
        f"{{{{- '<|start_header_id|>user<|end_header_id|>\n\n' + ({_js(image + chr(10))} "
        "* n_images) + text + '<|eot_id|>' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' + text + '<|eot_id|>' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
        "{%- endif -%}"
    )


TEMPLATES = ("nvgpt", "nv_steerlm", "nv_dpo", "llama_2", "llama_3", "v1")
# NeMo's DEFAULT_IM_START_TOKEN / DEFAULT_IM_END_TOKEN per mm_cfg.llm.model_type
IMAGE_START_END = {"llama_3": ("<|reserved_special_token_4|>", "<|reserved_special_token_5|>")}


def neva_template(
    conv_template: str, *, use_im_start_end: bool, dummy_prefix: bool, model_type: str = "nvgpt"
) -> str:
    """The Jinja chat template of a NeVA conversation format.

    ``dummy_prefix``: NeMo encodes the whole prompt in one SentencePiece call, which puts
    one "▁" before the very first character (even before a special token) and none after
    special tokens. The GGUF is written with ``add_space_prefix = false`` and the template
    starts with that one space, so llama.cpp reproduces SentencePiece's ids exactly."""
    start, end = IMAGE_START_END.get(model_type, ("<extra_id_4>", "<extra_id_5>"))
    image = f"{start}<image>{end}" if use_im_start_end else "<image>"
    lead = "{{- ' ' -}}" if dummy_prefix else ""
    if conv_template in ("nvgpt", "nv_steerlm"):
        return lead + _nvgpt(image, NVGPT_SYSTEM)
    if conv_template == "nv_dpo":
        return lead + _nvgpt(image, "\n")
    if conv_template == "llama_2":
        return lead + _llama_2(image)
    if conv_template == "v1":
        return lead + _vicuna_v1(image)
    if conv_template == "llama_3":
        return lead + _llama_3(image)
    raise UserError(
        f"NeVA conversation template {conv_template!r} (data.conv_template) is not supported; "
        f"mmchat knows {', '.join(TEMPLATES)}"
    )


def turn_end_token(conv_template: str) -> str | None:
    """The token that ends an assistant turn, when it is not </s>."""
    if conv_template == "llama_3":
        return "<|eot_id|>"
    return "<extra_id_1>" if conv_template in ("nvgpt", "nv_steerlm", "nv_dpo") else None


def hf_tokenizer(named: str, near: Path) -> Path:
    """The folder of a Hugging Face tokenizer a NeVA config names (``tokenizer.type``): a
    folder (as given, or next to the .nemo), else the repo's tokenizer files only."""
    for cand in (Path(named).expanduser(), near / named):
        if (cand / "tokenizer.json").is_file():
            return cand
    from ..source import is_repo_id

    if not is_repo_id(named):
        raise UserError(f"The NeVA tokenizer {named!r} is neither a folder nor a repo id")
    try:
        from huggingface_hub import hf_hub_download

        got = Path(hf_hub_download(named, "tokenizer.json"))
        with contextlib.suppress(Exception):  # optional
            hf_hub_download(named, "tokenizer_config.json")
    except Exception as exc:
        raise UserError(
            f"Cannot get the tokenizer {named!r} from the Hugging Face hub (for a gated repo "
            f"set HF_TOKEN): {str(exc).rstrip('.')}"
        ) from exc
    return got.parent


def adds_dummy_prefix(path: Path) -> bool:
    """NormalizerSpec.add_dummy_prefix of a SentencePiece model (default true)."""
    from ..tokenizer import _fields

    try:
        for num, wt, val in _fields(path.read_bytes()):
            if num == 3 and wt == 2:  # normalizer_spec
                for n2, w2, v2 in _fields(val):
                    if n2 == 3 and w2 == 0:
                        return bool(v2)
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path} is not a valid SentencePiece model: {exc}") from exc
    return True
