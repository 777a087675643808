"""Chat templates: messages with images → a sequence of text pieces and image slots.

Which template is used, first match wins:

1. an explicit template (a store manifest's ``template``): Jinja source, or the name of a
   known format below;
2. the GGUF's ``tokenizer.chat_template`` (Jinja, rendered in a sandbox the way
   transformers does: ``trim_blocks``, ``lstrip_blocks``, ``raise_exception``,
   ``bos_token``/``eos_token``, ``add_generation_prompt``);
3. a known format chosen from the model's name (``KNOWN_FORMATS``, a data table: add a row
   to support a family);
4. LLaVA 1.5's (Vicuna v1) format.

Images are placed where the model expects them, in one of two styles:

- ``marker_style = "llava"`` (the LLaVA engine): templates that take ``content`` as a string
  get a unique marker per image (at the start of the message, followed by a newline, as
  LLaVA was trained); templates that iterate over typed content parts (``{"type":
  "image"}``, transformers-style) write their own image token (``<image>``), which is then
  located.
- ``marker_style = "mtmd"`` (every family on llama.cpp's mtmd): as llama-server and Ollama
  do it, each image or audio clip becomes a media marker at the start of its message's text
  (markers then text, nothing between), the content is passed as a string (or, for
  templates that only take typed parts, as one text part), and the engine adds the family's
  own wrapper tokens around each image (``<start_of_image>``, ``<|vision_start|>`` …).

Either way ``render`` returns the prompt split into ``str`` pieces and ``ImageSlot`` entries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mmchat.errors import UserError


@dataclass(frozen=True)
class ChatFormat:
    """A known prompt format, for models whose GGUF carries no chat template."""

    name: str
    template: str
    """Jinja source; ``messages[i].content`` is a string holding image markers."""
    match: tuple[str, ...] = ()
    """Lower-case substrings of ``general.name``/``general.basename`` that select it."""
    image_token: str = "<image>"
    description: str = ""


# The Vicuna v1 conversation of LLaVA 1.5 (and LLaVA 1.6 on Vicuna):
#   "{system} USER: <image>\n{prompt} ASSISTANT: {reply}</s>USER: {prompt} ASSISTANT:"
_VICUNA_V1 = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }} "
    "{% elif m.role == 'user' %}USER: {{ m.content }} "
    "{% elif m.role == 'assistant' %}ASSISTANT: {{ m.content }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Mistral-instruct style of LLaVA 1.6 Mistral: "[INST] <image>\n{prompt} [/INST]"
_MISTRAL_INST = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{% set ns.system = m.content + '\n\n' %}"
    "{% elif m.role == 'user' %}[INST] {{ ns.system }}{{ m.content }} [/INST]"
    "{% set ns.system = '' %}"
    "{% elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

KNOWN_FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat(
        name="llava-1.6-mistral",
        template=_MISTRAL_INST,
        match=("llava-v1.6-mistral", "llava-1.6-mistral", "llava-next-mistral"),
        description="LLaVA 1.6 on Mistral-7B-Instruct: [INST] <image>\\n… [/INST]",
    ),
    ChatFormat(
        name="bakllava",
        template=_VICUNA_V1,
        match=("bakllava",),
        description="BakLLaVA-1 (Mistral-7B base, LLaVA 1.5 recipe): USER: <image>\\n… ASSISTANT:",
    ),
    ChatFormat(
        name="llava-1.5",
        template=_VICUNA_V1,
        match=("llava",),
        description="LLaVA 1.5 / 1.6-Vicuna: {system} USER: <image>\\n… ASSISTANT:",
    ),
)
DEFAULT_FORMAT = "llava-1.5"


def known_format(name: str) -> ChatFormat | None:
    for fmt in KNOWN_FORMATS:
        if fmt.name == name:
            return fmt
    return None


def guess_format(*names: str | None) -> ChatFormat:
    """The first known format whose ``match`` occurs in one of ``names`` (else LLaVA 1.5)."""
    hay = [n.lower() for n in names if n]
    for fmt in KNOWN_FORMATS:
        if any(m in h for m in fmt.match for h in hay):
            return fmt
    default = known_format(DEFAULT_FORMAT)
    assert default is not None
    return default


@dataclass(frozen=True)
class ImageSlot:
    """Where image number ``index`` (counted over all messages, in order) goes."""

    index: int


Piece = str | ImageSlot


@dataclass
class TemplateMessage:
    """What a template sees of a message: role, text, and how many images it carries."""

    role: str
    content: str
    n_images: int = 0


class TemplateError(UserError):
    """The chat template failed to render (its own ``raise_exception`` included)."""


_MARKER = "<|mmchat-image-{}|>"
_MARKER_RE = re.compile(r"<\|mmchat-image-(\d+)\|>")
_LITERAL = "\ue000mmchat-literal-image-token\ue000"
_PARTS_RE = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b|['"]type['"]""")


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        """transformers' ``{% generation %}…{% endgeneration %}``: renders its body as is."""

        tags = {"generation"}  # noqa: RUF012

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


@dataclass
class ChatTemplate:
    """A compiled chat template plus what is needed to place images."""

    source: str
    name: str = "custom"
    image_token: str = "<image>"
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "explicit"
    """Where it came from: "explicit", "gguf" or "builtin"."""
    marker_style: str = "llava"
    """How images are placed: "llava" or "mtmd" (see the module docstring)."""
    image_separator: str = ""
    """Between two images of one message ("llava" style): NVLM-D's chat puts a newline."""
    parts_style: bool = field(init=False)

    def __post_init__(self) -> None:
        from jinja2 import TemplateSyntaxError

        try:
            self._compiled = _environment().from_string(self.source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {self.name!r} is not valid Jinja: {exc}") from exc
        self.parts_style = bool(_PARTS_RE.search(self.source))

    @classmethod
    def from_format(cls, fmt: ChatFormat, *, bos_token: str, eos_token: str) -> ChatTemplate:
        return cls(
            source=fmt.template,
            name=fmt.name,
            image_token=fmt.image_token,
            bos_token=bos_token,
            eos_token=eos_token,
            origin="builtin",
        )

    def render_text(
        self, messages: Sequence[TemplateMessage], *, add_generation_prompt: bool = True
    ) -> str:
        """The rendered prompt as one string, image markers included (for ``/show``)."""
        return "".join(
            p if isinstance(p, str) else _MARKER.format(p.index)
            for p in self.render(messages, add_generation_prompt=add_generation_prompt)
        )

    def render(
        self, messages: Sequence[TemplateMessage], *, add_generation_prompt: bool = True
    ) -> list[Piece]:
        """Render and split into text pieces and image slots (in image order).

        A template that takes typed content parts may still expect a plain string for some
        messages (often the system prompt): the ways of passing content are tried in turn
        (all parts; system as a string; text-only messages as strings), and the first
        rendering that keeps every message's text and every image wins.
        """
        n_images = sum(m.n_images for m in messages)
        if self.marker_style == "mtmd":
            return self._render_mtmd(messages, n_images, add_generation_prompt)
        if not self.parts_style:
            return self._render_checked(self._marker_payload(messages), messages, n_images)
        first_error: TemplateError | None = None
        for as_string in (
            lambda m: False,
            lambda m: m.role == "system",
            lambda m: m.n_images == 0,
        ):
            payload = [
                {"role": m.role, "content": m.content} if as_string(m) else self._parts_message(m)
                for m in messages
            ]
            try:
                return self._render_checked(payload, messages, n_images, add_generation_prompt)
            except TemplateError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def _render_mtmd(
        self, messages: Sequence[TemplateMessage], n_images: int, add_generation_prompt: bool
    ) -> list[Piece]:
        contents: list[str] = []
        k = 0
        for m in messages:
            contents.append("".join(_MARKER.format(k + i) for i in range(m.n_images)) + m.content)
            k += m.n_images
        as_text = [{"role": m.role, "content": c} for m, c in zip(messages, contents, strict=True)]
        as_parts = [
            {"role": m.role, "content": [{"type": "text", "text": c}]}
            for m, c in zip(messages, contents, strict=True)
        ]
        first_error: TemplateError | None = None
        for payload in (as_text, as_parts):
            try:
                return self._render_checked(payload, messages, n_images, add_generation_prompt)
            except TemplateError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def _marker_payload(self, messages: Sequence[TemplateMessage]) -> list[dict[str, Any]]:
        payload = []
        k = 0
        for m in messages:
            markers = self.image_separator.join(_MARKER.format(k + i) for i in range(m.n_images))
            k += m.n_images
            content = (markers + "\n" + m.content) if markers else m.content
            payload.append({"role": m.role, "content": content})
        return payload

    def _render_checked(
        self,
        payload: list[dict[str, Any]],
        messages: Sequence[TemplateMessage],
        n_images: int,
        add_generation_prompt: bool = True,
    ) -> list[Piece]:
        try:
            text = self._compiled.render(
                messages=payload,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except Exception as exc:
            raise TemplateError(
                f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        pieces = self._split(text)
        found = sum(1 for p in pieces if isinstance(p, ImageSlot))
        if found != n_images:
            raise TemplateError(
                f"chat template {self.name!r} placed {found} image(s) for {n_images} attached"
            )
        if self.parts_style or self.marker_style == "mtmd":  # renderings that may drop text
            joined = "".join(p for p in pieces if isinstance(p, str))
            for m in messages:
                if m.content.strip() and m.content.strip() not in joined:
                    raise TemplateError(
                        f"chat template {self.name!r} left out the text of a {m.role} message"
                    )
        return pieces

    def _parts_message(self, m: TemplateMessage) -> dict[str, Any]:
        text = m.content.replace(self.image_token, _LITERAL) if self.image_token else m.content
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(m.n_images)]
        if text or not parts:
            parts.append({"type": "text", "text": text})
        return {"role": m.role, "content": parts}

    def _split(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        if self.parts_style and self.marker_style != "mtmd":
            chunks = text.split(self.image_token) if self.image_token else [text]
            for i, chunk in enumerate(chunks):
                if i:
                    out.append(ImageSlot(i - 1))
                if chunk:
                    out.append(chunk.replace(_LITERAL, self.image_token))
            return out
        pos = 0
        for mt in _MARKER_RE.finditer(text):
            if mt.start() > pos:
                out.append(text[pos : mt.start()])
            out.append(ImageSlot(int(mt.group(1))))
            pos = mt.end()
        if pos < len(text):
            out.append(text[pos:])
        order = [p.index for p in out if isinstance(p, ImageSlot)]
        if order != sorted(order):
            raise TemplateError(f"chat template {self.name!r} reordered the images")
        return out


def select_template(
    *,
    explicit: str | None,
    gguf_template: str | None,
    model_names: Sequence[str | None],
    bos_token: str,
    eos_token: str,
) -> ChatTemplate:
    """Pick the template for a model (see the module docstring for the order)."""
    if explicit:
        fmt = known_format(explicit.strip())
        if fmt is not None:
            return ChatTemplate.from_format(fmt, bos_token=bos_token, eos_token=eos_token)
        return ChatTemplate(
            source=explicit, name="custom", bos_token=bos_token, eos_token=eos_token
        )
    guess = guess_format(*model_names)
    if gguf_template:
        return ChatTemplate(
            source=gguf_template,
            name="gguf",
            image_token=guess.image_token,
            bos_token=bos_token,
            eos_token=eos_token,
            origin="gguf",
        )
    return ChatTemplate.from_format(guess, bos_token=bos_token, eos_token=eos_token)
