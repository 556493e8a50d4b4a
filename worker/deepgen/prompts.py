"""Prompt strings of DeepGen: raw template strings, no chat template call.

Templates and their use: docs/engine.md, 'Prompt templates'.

t2i:  INSTRUCTION(GENERATION(text)), the negative built the same way from the negative text.
edit: INSTRUCTION(f"{image block}\\n{text}"); the image block holds one
      `IMG_START + IMG_CONTEXT * n + IMG_END` per reference image, identical in the negative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The released model's template (docs/engine.md, 'Prompt templates'); a config's `prompt_template`
# overrides entries.
DEFAULT_PROMPT_TEMPLATE: dict[str, str] = {
    "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    "GENERATION": "Generate an image: {input}",
    "IMG_START_TOKEN": "<|vision_start|>",
    "IMG_END_TOKEN": "<|vision_end|>",
    "IMG_CONTEXT_TOKEN": "<|image_pad|>",
}


@dataclass(frozen=True)
class PromptTemplate:
    instruction: str
    generation: str
    image_start: str
    image_end: str
    image_context: str

    @classmethod
    def from_mapping(cls, template: Mapping[str, object] | None) -> PromptTemplate:
        merged = {
            **DEFAULT_PROMPT_TEMPLATE,
            **{k: v for k, v in (template or {}).items() if k in DEFAULT_PROMPT_TEMPLATE},
        }
        for key in ("INSTRUCTION", "GENERATION"):
            if "{input}" not in str(merged[key]):
                raise ValueError(f"prompt template {key} must contain '{{input}}', got {merged[key]!r}")
        return cls(
            instruction=str(merged["INSTRUCTION"]),
            generation=str(merged["GENERATION"]),
            image_start=str(merged["IMG_START_TOKEN"]),
            image_end=str(merged["IMG_END_TOKEN"]),
            image_context=str(merged["IMG_CONTEXT_TOKEN"]),
        )

    def text_to_image(self, text: str) -> str:
        # str.format does not re-parse the substituted value, so braces in user text are safe.
        return self.instruction.format(input=self.generation.format(input=text))

    def image_block(self, image_token_counts: Sequence[int]) -> str:
        return "".join(
            f"{self.image_start}{self.image_context * count}{self.image_end}" for count in image_token_counts
        )

    def edit(self, text: str, image_token_counts: Sequence[int]) -> str:
        return self.instruction.format(input=f"{self.image_block(image_token_counts)}\n{text}")
