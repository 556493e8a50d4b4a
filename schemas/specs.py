"""Job specifications: what a producer submits (pydantic v2, unknown fields rejected).

Sizes are rounded up to multiples of 32 as the DeepGen reference does; the job row records
the size actually used. Limits and defaults live in module constants so the CLI, the client and
the docs can quote them: these models are what every job is validated against, so their
defaults (`DEFAULT_*`) are the one source of the generation defaults.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

SIZE_MULTIPLE = 32
MIN_SIDE = 32
MAX_SIDE = 2048
MIN_STEPS = 1
MAX_STEPS = 200
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 8000
MAX_EDIT_IMAGES = 4
MAX_IMAGE_REF_CHARS = 2048
MIN_PRIORITY = 0  # normal
MAX_PRIORITY = 9  # most urgent
MAX_MODEL_NAME_CHARS = 64
MAX_IDEMPOTENCY_KEY_CHARS = 255
MIN_IMAGES_PER_PROMPT = 1
MAX_WEBHOOK_URL_CHARS = 2048  # [issue 11]
WEBHOOK_EVENTS = ("succeeded", "failed", "cancelled")  # [issue 11] what a webhook can be sent for
MAX_IMAGES_PER_PROMPT = 8  # one batched DiT call makes them all; artifacts are indexes 0..N-1

# Defaults of a job that does not say (the CLI's flags and the client's arguments use these).
DEFAULT_MODEL_NAME = "deepgen"
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_STEPS = 50
DEFAULT_T2I_SIDE = 512  # t2i height and width; an edit takes the first input image's (resized) size

# model_name is a Celery queue name and a Redis key part: keep it to a safe alphabet.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REMOTE_IMAGE_SCHEMES = ("s3://", "http://", "https://")


def is_remote_reference(reference: str) -> bool:
    """An s3:// or http(s):// image reference; URL schemes are case-insensitive (RFC 3986)."""
    return reference.lower().startswith(REMOTE_IMAGE_SCHEMES)


def round_up_to_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    return int(math.ceil(value / multiple) * multiple)


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as job text, or None. The spec is a PostgreSQL JSON document and
    some columns are text: neither holds NUL (a stored \\u0000 breaks ``spec->>'prompt'``), and a lone
    surrogate cannot be encoded as UTF-8 (pydantic refuses those in str fields itself; the CLI's file
    readers use this to name the line)."""
    if "\x00" in value:
        return "must not contain NUL characters (\\x00)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text (a lone surrogate {value[exc.start]!r} at character {exc.start})"
    return None


def _storable_text(name: str, value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError("storable_text", "{field} {problem}", {"field": name, "problem": problem})
    return value


def _finite_number(name: str, value: Any) -> Any:
    """Before float parsing: NaN/inf would otherwise be reported as out of range ("less than ...")."""
    if isinstance(value, int | float | str):  # what the float parser accepts; the rest gets its own error
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return value
        if not math.isfinite(number):
            raise PydanticCustomError(
                "finite_number",
                "{field} must be a finite number, got {value}",
                {"field": name, "value": str(value)},
            )
    return value


def _check_side(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if value < MIN_SIDE or value > MAX_SIDE:
        raise ValueError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}")
    return round_up_to_multiple(value)


class _StrictModel(BaseModel):
    # allow_inf_nan=False: no float field takes NaN or infinity (guidance_scale also says so by name).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GenerationParams(_StrictModel):
    guidance_scale: float = Field(default=DEFAULT_GUIDANCE_SCALE, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    num_inference_steps: int = Field(default=DEFAULT_STEPS, ge=MIN_STEPS, le=MAX_STEPS)
    # t2i needs a size: null is rejected here (edit may leave it to the first input image).
    height: int | None = DEFAULT_T2I_SIDE
    width: int | None = DEFAULT_T2I_SIDE
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images_per_prompt: int = Field(
        default=MIN_IMAGES_PER_PROMPT, ge=MIN_IMAGES_PER_PROMPT, le=MAX_IMAGES_PER_PROMPT
    )

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        return _finite_number(info.field_name or "value", value)

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_text(cls, value: str) -> str:
        return _storable_text("negative_prompt", value)

    @field_validator("height", "width")
    @classmethod
    def _round_side(cls, value: int | None, info: Any) -> int | None:
        if value is None and not cls._size_optional:
            raise ValueError(f"{info.field_name} must be a number of pixels, not null")
        return _check_side(info.field_name, value)

    _size_optional: ClassVar[bool] = False


class EditParams(GenerationParams):
    _size_optional: ClassVar[bool] = True
    # None: the output takes the (resized) size of the first input image.
    height: int | None = None
    width: int | None = None


class _SpecBase(_StrictModel):
    model_name: str = Field(default=DEFAULT_MODEL_NAME, min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    priority: int = Field(default=MIN_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS)
    # [issue 11] A signed POST of the job when it ends (docs/events.md); only for the events listed
    # (None: succeeded, failed and cancelled). The address check (no private networks) is the
    # client's at submit and the deliverer's at every attempt: it depends on their settings.
    webhook_url: str | None = Field(default=None, max_length=MAX_WEBHOOK_URL_CHARS)
    webhook_events: list[Literal["succeeded", "failed", "cancelled"]] | None = Field(
        default=None, min_length=1
    )

    @field_validator("model_name")
    @classmethod
    def _model_name_alphabet(cls, value: str) -> str:
        if not MODEL_NAME_PATTERN.match(value):
            raise ValueError("model_name may contain only letters, digits, '_', '.' and '-'")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _idempotency_key_text(cls, value: str | None) -> str | None:
        return None if value is None else _storable_text("idempotency_key", value)

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:  # [issue 11]
        if value is None:
            return None
        problem = webhook_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, value: list[str] | None) -> list[str] | None:  # [issue 11] stored in one order
        return None if value is None else [event for event in WEBHOOK_EVENTS if event in value]


def webhook_url_problem(url: str) -> str | None:
    """[issue 11] Why ``url`` cannot be a webhook (not http(s), no host, credentials, spaces), or None."""
    from urllib.parse import urlsplit

    shown = repr(url[:80])
    if text_problem(url) is not None or any(char.isspace() for char in url):
        return f"webhook_url {shown} is not a valid URL"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"webhook_url {shown} is not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        return f"webhook_url must be an http:// or https:// URL, got {shown}"
    if not parts.hostname:
        return f"webhook_url {shown} has no host"
    if parts.username is not None or parts.password is not None:
        return "webhook_url must not carry credentials (user:password@); check the signature instead"
    return None


def _non_blank(name: str, value: str) -> str:
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


class T2ISpec(_SpecBase):
    kind: Literal["t2i"] = "t2i"
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    params: GenerationParams = Field(default_factory=GenerationParams)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        return _non_blank("prompt", _storable_text("prompt", value))


class EditSpec(_SpecBase):
    kind: Literal["edit"] = "edit"
    instruction: str = Field(max_length=MAX_PROMPT_CHARS)
    images: list[str] = Field(min_length=1, max_length=MAX_EDIT_IMAGES)
    params: EditParams = Field(default_factory=EditParams)

    @field_validator("instruction")
    @classmethod
    def _instruction_not_blank(cls, value: str) -> str:
        return _non_blank("instruction", _storable_text("instruction", value))

    @field_validator("images")
    @classmethod
    def _image_refs(cls, refs: list[str]) -> list[str]:
        for position, ref in enumerate(refs):
            bad_text = text_problem(ref) is not None
            if not ref or len(ref) > MAX_IMAGE_REF_CHARS or bad_text or any(c.isspace() for c in ref.strip()):
                raise ValueError(f"images[{position}] is not a valid image reference: {ref[:80]!r}")
            if "://" in ref:
                if not is_remote_reference(ref):
                    raise ValueError(
                        f"images[{position}] uses an unsupported scheme (use s3://, http:// or https://): {ref[:80]!r}"
                    )
                if ref.split("://", 1)[1].strip("/") == "":
                    raise ValueError(f"images[{position}] has no host/bucket: {ref!r}")
            # Other values are local paths: only the embedded worker accepts them (checked at load).
        return refs

    def remote_only(self) -> bool:
        return all(is_remote_reference(ref) for ref in self.images)


JobSpec = Annotated[T2ISpec | EditSpec, Field(discriminator="kind")]
_JOB_SPEC_ADAPTER: TypeAdapter[T2ISpec | EditSpec] = TypeAdapter(JobSpec)


def parse_job_spec(data: Any) -> T2ISpec | EditSpec:
    """Validate a dict (or JSON string/bytes) into a spec; raises pydantic.ValidationError."""
    if isinstance(data, T2ISpec | EditSpec):
        return data
    if isinstance(data, str | bytes):
        return _JOB_SPEC_ADAPTER.validate_json(data)
    return _JOB_SPEC_ADAPTER.validate_python(data)
