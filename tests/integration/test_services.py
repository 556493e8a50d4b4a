"""The real services the suite depends on answer (fails loudly when one is down)."""

import boto3
import redis
import sqlalchemy as sa
from botocore.config import Config


def test_postgres_database_is_usable(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 1")).scalar() == 1
    engine.dispose()


def test_redis_answers(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.set("dg-probe", "1")
    assert r.get("dg-probe") == b"1"


def test_moto_s3_round_trip(s3_endpoint: str, s3_bucket: str) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello", ContentType="text/plain")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"
