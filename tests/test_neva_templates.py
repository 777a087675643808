"""NeVA's conversation templates render multi-turn chats exactly as NeMo's
``Conversation.get_prompt`` builds them (nemo/collections/multimodal/data/neva/
conversation.py, with NeMo's <extra_id_6>/<extra_id_7> already swapped for <s>/</s>), the
image at the start of the user's message followed by a newline. No torch needed."""

from __future__ import annotations

import pytest
from mmchat.converters.families.neva_templates import (
    LLAVA_LLAMA_2_SYSTEM,
    NVGPT_LABEL,
    NVGPT_SYSTEM,
    VICUNA_V1_SYSTEM,
    neva_template,
)

from mmchat.errors import UserError
from mmchat.runtime.template import ChatTemplate, TemplateMessage

IMG = "<|mmchat-image-0|>"  # where mmchat's runtime puts the image rows

CHAT = [
    TemplateMessage(role="user", content="What is this?", n_images=1),
    TemplateMessage(role="assistant", content="A cat."),
    TemplateMessage(role="user", content="Which colour?"),
]

EXPECTED = {
    "nvgpt": (
        f" <extra_id_0>System\n{NVGPT_SYSTEM}<extra_id_1>User\n{IMG}\nWhat is this?\n"
        f"<extra_id_1>Assistant\n{NVGPT_LABEL}A cat.\n<extra_id_1>User\nWhich colour?\n"
        f"<extra_id_1>Assistant\n{NVGPT_LABEL}"
    ),
    "llama_2": (
        f"  [INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n{IMG}\nWhat is this? [/INST]"
        " A cat. </s><s> [INST] Which colour? [/INST]"
    ),
    "v1": (
        f" {VICUNA_V1_SYSTEM} USER: {IMG}\nWhat is this? ASSISTANT: A cat.</s> USER: Which "
        "colour? ASSISTANT:"
    ),
    "llama_3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{LLAVA_LLAMA_2_SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        f"{IMG}\nWhat is this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "A cat.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhich colour?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("conv", sorted(EXPECTED))
def test_multi_turn_matches_nemo(conv: str) -> None:
    spm = conv != "llama_3"  # SentencePiece's one dummy "▁" is written as a leading space
    src = neva_template(conv, use_im_start_end=False, dummy_prefix=spm, model_type=conv)
    got = ChatTemplate(source=src, name=conv).render_text(CHAT)
    assert got == EXPECTED[conv]


def test_image_start_end_tokens_stay_text() -> None:
    src = neva_template("nvgpt", use_im_start_end=True, dummy_prefix=False)
    got = ChatTemplate(source=src, name="nvgpt").render_text(CHAT[:1])
    assert f"User\n<extra_id_4>{IMG}<extra_id_5>\nWhat is this?" in got
    src = neva_template("llama_3", use_im_start_end=True, dummy_prefix=False, model_type="llama_3")
    got = ChatTemplate(source=src, name="llama_3").render_text(CHAT[:1])
    assert f"<|reserved_special_token_4|>{IMG}<|reserved_special_token_5|>\nWhat" in got


def test_system_message_replaces_the_default() -> None:
    src = neva_template("nvgpt", use_im_start_end=False, dummy_prefix=False)
    msgs = [TemplateMessage(role="system", content="Be brief."), *CHAT[:1]]
    got = ChatTemplate(source=src, name="nvgpt").render_text(msgs)
    assert got.startswith("<extra_id_0>System\nBe brief.<extra_id_1>User\n")


def test_unknown_conversation_template() -> None:
    with pytest.raises(UserError, match="conv_template"):
        neva_template("yi_34b", use_im_start_end=False, dummy_prefix=True)
