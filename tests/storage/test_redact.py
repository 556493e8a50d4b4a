from worker.redact import redact_url, redact_urls_in


def test_password_in_userinfo_is_hidden_and_user_kept() -> None:
    assert redact_url("redis://admin:hunter2@redis:6379/0") == "redis://admin:***@redis:6379/0"
    assert redact_url("postgresql+psycopg://dg:p%40ss@db/jobs") == "postgresql+psycopg://dg:***@db/jobs"


def test_url_without_secrets_is_unchanged() -> None:
    for url in (
        "s3://bucket/prefix",
        "http://user@host/x?a=1",
        "/local/path.png",
        "file:///tmp/x",
        "not a url",
    ):
        assert redact_url(url) == url


def test_presigned_query_credentials_are_hidden() -> None:
    url = (
        "https://s3.example.test/b/k.png?X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=abcdef&X-Amz-Expires=60"
    )
    redacted = redact_url(url)
    assert "abcdef" not in redacted and "AKIA" not in redacted
    assert "X-Amz-Expires=60" in redacted and redacted.startswith("https://s3.example.test/b/k.png?")


def test_urls_inside_text_are_redacted() -> None:
    text = 'Could not connect to the endpoint URL: "http://user:s3cret@127.0.0.1:9/x"'
    assert redact_urls_in(text) == 'Could not connect to the endpoint URL: "http://user:***@127.0.0.1:9/x"'


def test_password_with_slash_or_at_is_hidden_entirely() -> None:
    # urlsplit ends the host at the first `/`, and a first-`@` split keeps the tail of the password.
    assert redact_url("postgres://dg:s3cr/et@db:5432/jobs") == "postgres://dg:***@db:5432/jobs"
    assert redact_url("mysql://dg:p@ss@db/jobs") == "mysql://dg:***@db/jobs"
    assert redact_url("postgres://dg:pa?ss@db/jobs") == "postgres://dg:***@db/jobs"
    assert (
        redact_urls_in("failed: redis://:s3cr/et@r:6379/0 refused") == "failed: redis://:***@r:6379/0 refused"
    )


def test_at_sign_in_a_path_after_a_port_is_not_a_password() -> None:
    for url in ("http://example.com:8080/img@2x.png", "https://host/img@2x.png"):
        assert redact_url(url) == url
    assert redact_url("https://u:p@host/p?email=a@b.com") == "https://u:***@host/p?email=a@b.com"
