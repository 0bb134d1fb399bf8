"""The shared service fixtures give working, isolated services."""

import asyncpg
import pytest
import redis


@pytest.mark.integration
async def test_postgres_url_points_at_a_private_database(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+asyncpg://")
    conn = await asyncpg.connect(postgres_url.replace("+asyncpg", "", 1))
    try:
        name = await conn.fetchval("select current_database()")
        await conn.execute("create table fixture_probe (x int)")  # ours to write to
        await conn.execute("drop table fixture_probe")
    finally:
        await conn.close()
    assert name.startswith("loragate_test_") and name in postgres_url


@pytest.mark.integration
def test_redis_url_is_flushed_before_use(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
        client.set("loragate:fixture-check", "1")
        assert client.get("loragate:fixture-check") == b"1"
    finally:
        client.close()


@pytest.mark.integration
def test_s3_server_takes_its_credentials_and_refuses_others(s3_server) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="fixture/check", Body=b"payload")
    body = client.get_object(Bucket=s3_server.bucket, Key="fixture/check")["Body"].read()
    assert body == b"payload"
    client.delete_object(Bucket=s3_server.bucket, Key="fixture/check")

    import boto3
    from botocore.exceptions import ClientError

    intruder = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="not-the-secret",
        region_name=s3_server.region,
    )
    with pytest.raises(ClientError):
        intruder.list_objects_v2(Bucket=s3_server.bucket)
