"""Spec validation messages name the field; settings errors name the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.specs import MAX_EDIT_IMAGES, MAX_SIDE, EditSpec, T2ISpec, parse_job_spec
from worker.settings import SettingsError, load_settings


def _error(data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        parse_job_spec(data)
    return str(info.value)


def test_defaults_and_rounding() -> None:
    spec = parse_job_spec({"kind": "t2i", "prompt": "a cat", "params": {"height": 500, "width": 33}})
    assert isinstance(spec, T2ISpec)
    assert (spec.params.height, spec.params.width) == (512, 64)
    assert (spec.params.guidance_scale, spec.params.num_inference_steps, spec.params.negative_prompt) == (
        4.0,
        50,
        "",
    )
    assert spec.model_name == "deepgen" and spec.priority == 0 and spec.params.seed is None
    edit = parse_job_spec({"kind": "edit", "instruction": "x", "images": ["s3://b/k.png"]})
    assert isinstance(edit, EditSpec) and edit.params.height is None and edit.params.width is None


@pytest.mark.parametrize(
    ("data", "field", "text"),
    [
        ({"kind": "t2i", "prompt": "a", "colour": "red"}, "colour", "Extra inputs"),
        ({"kind": "t2i", "prompt": "   "}, "prompt", "must not be empty"),
        ({"kind": "t2i", "prompt": "a", "params": {"height": 0}}, "height", "between 32 and"),
        ({"kind": "t2i", "prompt": "a", "params": {"width": MAX_SIDE + 1}}, "width", "between 32 and"),
        (
            {"kind": "t2i", "prompt": "a", "params": {"num_inference_steps": 0}},
            "num_inference_steps",
            "greater than or equal to 1",
        ),
        (
            {"kind": "t2i", "prompt": "a", "params": {"guidance_scale": -1}},
            "guidance_scale",
            "greater than or equal to 0",
        ),
        (
            {"kind": "t2i", "prompt": "a", "params": {"guidance_scale": 31}},
            "guidance_scale",
            "less than or equal to 30",
        ),
        (
            {"kind": "t2i", "prompt": "a", "params": {"guidance_scale": float("nan")}},
            "guidance_scale",
            "must be a finite number",
        ),
        (
            {"kind": "t2i", "prompt": "a", "params": {"guidance_scale": float("inf")}},
            "guidance_scale",
            "must be a finite number",
        ),
        ({"kind": "t2i", "prompt": "a\x00"}, "prompt", "must not contain NUL"),
        (
            {"kind": "t2i", "prompt": "a", "params": {"negative_prompt": "\x00"}},
            "negative_prompt",
            "must not contain NUL",
        ),
        (
            {"kind": "edit", "instruction": "x\x00", "images": ["s3://b/k"]},
            "instruction",
            "must not contain NUL",
        ),
        (
            {"kind": "t2i", "prompt": "a", "params": {"num_inference_steps": 201}},
            "num_inference_steps",
            "less than or equal to 200",
        ),
        ({"kind": "t2i", "prompt": "a", "params": {"height": -5}}, "height", "between 32 and"),
        ({"kind": "t2i", "prompt": "a", "params": {"height": None}}, "height", "not null"),
        ({"kind": "t2i", "prompt": "a", "params": {"sampler": "euler"}}, "sampler", "Extra inputs"),
        ({"kind": "t2i", "prompt": ""}, "prompt", "must not be empty"),
        ({"kind": "edit", "instruction": " ", "images": ["s3://b/k"]}, "instruction", "must not be empty"),
        (
            {"kind": "edit", "instruction": "x", "images": ["s3://b/a b.png"]},
            "images",
            "not a valid image reference",
        ),
        ({"kind": "t2i", "prompt": "a", "model_name": "a b"}, "model_name", "letters, digits"),
        ({"kind": "t2i", "prompt": "a", "priority": 10}, "priority", "less than or equal to 9"),
        ({"kind": "edit", "instruction": "x", "images": []}, "images", "at least 1"),
        (
            {"kind": "edit", "instruction": "x", "images": ["s3://b/k"] * (MAX_EDIT_IMAGES + 1)},
            "images",
            "at most",
        ),
        ({"kind": "edit", "instruction": "x", "images": ["ftp://h/a.png"]}, "images", "unsupported scheme"),
        ({"kind": "edit", "instruction": "x", "images": ["s3://"]}, "images", "no host/bucket"),
        ({"kind": "video", "prompt": "a"}, "kind", "does not match any of the expected tags"),
    ],
)
def test_bad_specs_name_the_field(data: dict, field: str, text: str) -> None:
    message = _error(data)
    assert field in message and text in message


def test_settings_validation_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="DG_MAX_ATTEMPTS"):
        load_settings({"DG_MAX_ATTEMPTS": "zero"})
    with pytest.raises(SettingsError, match=r"DG_LEASE_SECONDS.*greater than 0"):
        load_settings({"DG_LEASE_SECONDS": "-1"})
    with pytest.raises(SettingsError, match="DG_HEARTBEAT_SECONDS"):
        load_settings({"DG_LEASE_SECONDS": "5", "DG_HEARTBEAT_SECONDS": "5"})
    with pytest.raises(SettingsError, match="DG_SOFT_TIME_LIMIT_SECONDS"):
        load_settings({"DG_SOFT_TIME_LIMIT_SECONDS": "4000"})
    with pytest.raises(SettingsError, match="DG_VISIBILITY_TIMEOUT_SECONDS"):
        load_settings({"DG_VISIBILITY_TIMEOUT_SECONDS": "100"})
    with pytest.raises(SettingsError, match=r"DG_DATABASE_URL='mysql://u:\*\*\*@h/db'"):
        load_settings({"DG_DATABASE_URL": "mysql://u:secret@h/db"})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgres://dg:s3cr/et@db:5432/jobs", "postgres://dg:***@db:5432/jobs"),
        ("mysql://dg:p@ss@db/jobs", "mysql://dg:***@db/jobs"),
    ],
)
def test_settings_errors_hide_passwords_with_slash_or_at(url: str, shown: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"DG_DATABASE_URL": url})
    message = str(error.value)
    assert shown in message and "s3cr" not in message and "et@" not in message and "ss@" not in message
    with pytest.raises(SettingsError) as error:
        load_settings({"DG_BROKER_URL": url})
    assert shown in str(error.value)


def test_republish_stale_defaults_to_the_visibility_timeout() -> None:
    assert load_settings({}).republish_stale_seconds == 7200.0
    assert load_settings({"DG_VISIBILITY_TIMEOUT_SECONDS": "9000"}).republish_stale_seconds == 9000.0
    assert load_settings({"DG_REPUBLISH_STALE_SECONDS": "600"}).republish_stale_seconds == 600.0
    with pytest.raises(SettingsError, match="DG_REPUBLISH_STALE_SECONDS"):
        load_settings({"DG_REPUBLISH_STALE_SECONDS": "0"})


def test_settings_embedded_and_worker_defaults(tmp_path) -> None:
    embedded = load_settings({"DG_HOME": str(tmp_path)})
    assert embedded.embedded and embedded.allow_local_inputs
    assert embedded.database_url == f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    assert embedded.storage_url == (tmp_path / "artifacts").as_uri()
    queued = load_settings(
        {"DG_BROKER_URL": "redis://h:6379/2", "DG_DATABASE_URL": "postgresql+psycopg://h/jobs"}
    )
    assert (
        not queued.embedded
        and not queued.allow_local_inputs
        and queued.worker_broker_url == "redis://h:6379/2"
    )
    # SSRF guard: on for shared workers, off for the user's own embedded runs; either can be overridden.
    assert embedded.input_allow_private_networks and not queued.input_allow_private_networks
    opened = load_settings(
        {
            "DG_BROKER_URL": "redis://h:6379/2",
            "DG_DATABASE_URL": "postgresql+psycopg://h/jobs",
            "DG_INPUT_ALLOW_PRIVATE_NETWORKS": "true",
        }
    )
    assert opened.input_allow_private_networks
    assert not load_settings(
        {"DG_HOME": str(tmp_path), "DG_INPUT_ALLOW_PRIVATE_NETWORKS": "0"}
    ).input_allow_private_networks
    with pytest.raises(SettingsError, match="DG_INPUT_ALLOW_PRIVATE_NETWORKS"):
        load_settings({"DG_INPUT_ALLOW_PRIVATE_NETWORKS": "maybe"})
    assert load_settings({}).worker_broker_url == "redis://127.0.0.1:6379/0"


def test_remote_schemes_are_case_insensitive() -> None:
    from schemas.specs import EditSpec, is_remote_reference

    spec = EditSpec(instruction="x", images=["S3://bucket/a.png", "HTTPS://example.com/b.png"])
    assert spec.remote_only() and is_remote_reference("Http://h/c.png") and not is_remote_reference("c.png")
