from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image

from worker.png import (
    PngError,
    encode_png,
    generation_metadata,
    png_info,
    read_generation_metadata,
    read_png_metadata,
)


def _image() -> Image.Image:
    image = Image.new("RGB", (40, 24))
    image.putdata([(x * 6 % 256, y * 10 % 256, (x + y) % 256) for y in range(24) for x in range(40)])
    return image


def test_metadata_round_trip_including_non_latin_text() -> None:
    metadata = generation_metadata(
        prompt="a red fox in snow, 雪の中の狐",
        parameters={"guidance_scale": 4.0, "num_inference_steps": 50, "height": 24, "width": 40},
        seed=1234,
        model="deepgen",
        job_id="0b5e7c",
    )
    data = encode_png(_image(), metadata)

    assert read_png_metadata(data) == metadata
    record = json.loads(metadata["diffgentor"])
    assert record["parameters"]["num_inference_steps"] == 50 and record["seed"] == 1234
    assert read_generation_metadata(data) == {
        "prompt": "a red fox in snow, 雪の中の狐",
        "parameters": {"guidance_scale": 4.0, "num_inference_steps": 50, "height": 24, "width": 40},
        "seed": 1234,
        "model": "deepgen",
        "job_id": "0b5e7c",
    }
    assert (metadata["prompt"], metadata["seed"], metadata["job_id"]) == (
        "a red fox in snow, 雪の中の狐",
        "1234",
        "0b5e7c",
    )
    assert list(Image.open(io.BytesIO(data)).convert("RGB").getdata()) == list(_image().getdata())


def test_parameters_is_the_a1111_text_line() -> None:
    params = {
        "guidance_scale": 4.0,
        "num_inference_steps": 50,
        "height": 512,
        "width": 768,
        "negative_prompt": "blurry, dark",
        "seed": 7,
    }
    metadata = generation_metadata(
        prompt="PROMPT\nsecond line", parameters=params, seed=7, model="deepgen", job_id="j"
    )
    assert metadata["parameters"] == (
        "PROMPT\nsecond line\n"
        "Negative prompt: blurry, dark\n"
        "Steps: 50, Sampler: FlowMatchEuler, CFG scale: 4.0, Seed: 7, Size: 768x512, Model: deepgen"
    )
    no_negative = generation_metadata(
        prompt="p", parameters={**params, "negative_prompt": ""}, seed=7, model="my, model", job_id="j"
    )
    assert no_negative["parameters"] == (
        'p\nSteps: 50, Sampler: FlowMatchEuler, CFG scale: 4.0, Seed: 7, Size: 768x512, Model: "my, model"'
    )


def test_pngs_written_before_the_diffgentor_key_are_still_read() -> None:
    old = {
        "prompt": "p",
        "parameters": '{"num_inference_steps":3}',
        "seed": "9",
        "model": "deepgen",
        "job_id": "j",
    }
    assert read_generation_metadata(encode_png(_image(), old)) == {
        "prompt": "p",
        "parameters": {"num_inference_steps": 3},
        "seed": 9,
        "model": "deepgen",
        "job_id": "j",
    }


def test_same_image_and_metadata_give_identical_bytes() -> None:
    first = encode_png(_image(), {"seed": "1", "prompt": "p"})
    second = encode_png(_image(), {"prompt": "p", "seed": "1"})  # key order must not matter
    assert first == second
    assert encode_png(_image(), {"prompt": "p", "seed": "2"}) != first


def test_png_info_reports_size_and_digest() -> None:
    data = encode_png(_image(), {"prompt": "p"})
    info = png_info(data)
    assert info == (40, 24, hashlib.sha256(data).hexdigest(), len(data))
    assert (info.width, info.height, info.size) == (40, 24, len(data))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(PngError, match="not a PNG"):
        png_info(b"GIF89a....")
    with pytest.raises(PngError, match="not a readable PNG"):
        read_png_metadata(encode_png(_image(), {"a": "b"})[:60])
    with pytest.raises(PngError, match="1-79 characters"):
        encode_png(_image(), {" padded": "x"})
    with pytest.raises(PngError, match="must be a str"):
        encode_png(_image(), {"seed": 5})  # type: ignore[dict-item]
