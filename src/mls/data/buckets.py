"""A shard set in an S3 bucket (``s3://bucket/prefix``, on AWS or any S3-compatible endpoint): checked before
the work, uploaded by ``mls shard``, and the store's refusals said in one line.

The client is boto3's, as litdata's: the same environment reaches both (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for MinIO and the like,
``AWS_CA_BUNDLE`` for an endpoint signed by a private authority). Only ``s3://`` is checked here; the other
URLs litdata reads are left to its own messages.
"""
from __future__ import annotations

from pathlib import Path

CREDENTIALS = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for it"
# error codes of a request the store refused for its credentials or their rights
REFUSED = {"403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken"}
MISSING_BUCKET = {"NoSuchBucket"}
MISSING_KEY = {"404", "NoSuchKey", "NotFound"}


def is_s3(location: str) -> bool:
    """Whether ``location`` is an S3 URL (the store this module checks)."""
    return str(location).startswith("s3://")


def bucket_and_prefix(location: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``."""
    bucket, _, prefix = str(location)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{location}: no bucket named; expected s3://bucket/path")
    return bucket, prefix.strip("/")


def _client():
    import boto3
    from botocore.config import Config

    # a session of its own: boto3's default one keeps the credentials it first found
    return boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                                connect_timeout=10))


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def plain_error(error: Exception, location: str, name: str | None, endpoint: str) -> Exception:
    """botocore's ``error`` on ``location`` (file ``name`` of it, or the bucket itself) as one line that names
    the problem: no credentials, credentials refused, no such bucket, no such file, endpoint unreachable."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    bucket, _ = bucket_and_prefix(location)
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return ValueError(f"no credentials to read s3://{bucket}: {CREDENTIALS}")
    if isinstance(error, EndpointConnectionError):
        return ValueError(f"cannot reach the S3 endpoint {endpoint} (AWS_ENDPOINT_URL if not AWS's): {error}")
    if not isinstance(error, ClientError):
        return ValueError(f"{location}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code in REFUSED:
        return PermissionError(f"the S3 endpoint {endpoint} refused the credentials for s3://{bucket} ({code}): "
                               f"check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may read the bucket")
    if code in MISSING_BUCKET or (code in MISSING_KEY and name is None):
        return FileNotFoundError(f"no bucket {bucket!r} at the S3 endpoint {endpoint}")
    if code in MISSING_KEY:
        return FileNotFoundError(f"{location} is not a shard set made by `mls shard`: no {name} in it")
    return ValueError(f"{location}: the S3 endpoint {endpoint} answered {code}: {error}")


def check_readable(location: str, names: tuple[str, ...]) -> None:
    """Fail before training, in one line, unless the bucket answers with the files ``names`` under the prefix
    (credentials, bucket, each file)."""
    bucket, prefix = bucket_and_prefix(location)
    client = _client()
    for name in names:
        try:
            client.head_object(Bucket=bucket, Key=_key(prefix, name))
        except Exception as error:  # botocore's kinds, said in plain words
            raise _head_error(client, error, location, name) from None


def _head_error(client, error: Exception, location: str, name: str) -> Exception:
    """A HEAD answers 404 for a missing bucket as for a missing file: ask the bucket to tell them apart."""
    plain = plain_error(error, location, name, client.meta.endpoint_url)
    if isinstance(plain, FileNotFoundError):
        try:
            client.head_bucket(Bucket=bucket_and_prefix(location)[0])
        except Exception as bucket_error:  # noqa: BLE001 - any refusal of the bucket is the clearer report
            return plain_error(bucket_error, location, None, client.meta.endpoint_url)
    return plain


def check_writable(location: str) -> None:
    """Fail before sharding unless the bucket exists, takes these credentials and holds nothing under the prefix."""
    bucket, prefix = bucket_and_prefix(location)
    client = _client()
    try:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=_key(prefix, ""), MaxKeys=1)
    except Exception as error:  # botocore's kinds, said in plain words
        raise plain_error(error, location, None, client.meta.endpoint_url) from None
    if listed.get("KeyCount", 0):
        raise FileExistsError(f"--out {location} is not empty; shard into a new prefix (an interrupted `mls shard` "
                              "leaves one without its manifest: delete it and shard again)")


def upload_folder(folder: Path, location: str, last: str) -> None:
    """Every file of ``folder`` put under ``location``, the file named ``last`` (a shard set's manifest) after
    the others: a prefix without it is not a shard set, so an interrupted upload is never read as one."""
    bucket, prefix = bucket_and_prefix(location)
    client = _client()
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: (p.name == last, p.name))
    for path in files:
        try:
            with open(path, "rb") as body:
                client.put_object(Bucket=bucket, Key=_key(prefix, path.name), Body=body)
        except Exception as error:  # botocore's kinds, said in plain words
            raise plain_error(error, location, path.name, client.meta.endpoint_url) from None
