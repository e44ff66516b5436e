"""A shard set in a bucket, over the S3 protocol: moto's S3 server on the loopback address (HTTPS, with a
certificate authority made here), reached through the environment as AWS or MinIO would be. `mls shard` writes
into it, pretraining reads from it as from the local shards (same losses, same resumption, same split across
ranks), and what the store refuses ends as one line."""
import datetime
import ipaddress
import sys
import threading
from pathlib import Path

import boto3
import moto.settings
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from conftest import assert_resumed_like_straight
from mls.checkpoints.pretrained import read_checkpoint
from mls.cli import console, main
from mls.data.sharding import shard
from mls.train import pretrain
from mls.train.module import PretrainModule
from test_data_shards import RUN, Crash, assert_two_ranks_split_one_rank_s_batches, loss_rows, write_folder

pytestmark = pytest.mark.slow


def _certificate(name: str, key, issuer: x509.Name, issuer_key, authority: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True))
    if not authority:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A certificate authority and the server's certificate for 127.0.0.1 signed by it: (authority, cert, key).
    HTTPS because litdata 0.2.76 reads chunks through obstore, which it builds without ``allow_http``."""
    authority_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mls test authority")])
    authority = _certificate("mls test authority", authority_key, name, authority_key, True)
    paths = folder / "authority.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(authority.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(_certificate("127.0.0.1", key, name, authority_key, False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port over HTTPS; yields the environment that reaches it."""
    folder = tmp_path_factory.mktemp("s3")
    authority, cert, key = write_tls_files(folder)
    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=True,
                         ssl_context=(str(cert), str(key)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"https://127.0.0.1:{server.server_address[1]}",
           "AWS_CA_BUNDLE": str(authority), "SSL_CERT_FILE": str(authority),  # boto3's, obstore's
           "AWS_CONFIG_FILE": str(folder / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(folder / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    yield env
    server.shutdown()
    thread.join()


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """The server's environment in this test (and the processes it starts), the cache in ``tmp_path``; a boto3
    client of the server."""
    for name, value in {**s3_server, "MLS_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3")


def new_bucket(client, name: str) -> str:
    client.create_bucket(Bucket=name)
    return name


def test_mls_shard_writes_into_a_bucket_and_pretraining_reads_it_as_the_local_shards(s3, tmp_path, capsys):
    new_bucket(s3, "shard-and-train")
    write_folder(tmp_path / "imgs", 32)
    main(["shard", str(tmp_path / "imgs"), "--out", "s3://shard-and-train/coco/train", "--workers", "1"])
    listed = s3.list_objects_v2(Bucket="shard-and-train", Prefix="coco/train/")["Contents"]
    keys = {item["Key"].removeprefix("coco/train/") for item in listed}
    assert {"index.json", "mls_shards.json", "names.txt"} <= keys and any(k.endswith(".bin") for k in keys)
    assert "next: mls pretrain --data s3://shard-and-train/coco/train" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--out s3://shard-and-train/coco/train is not empty"):
        main(["shard", str(tmp_path / "imgs"), "--out", "s3://shard-and-train/coco/train", "--workers", "1"])

    shard(str(tmp_path / "imgs"), out=str(tmp_path / "shards"), workers=1)
    local = pretrain(data=str(tmp_path / "shards"), out=str(tmp_path / "local"), **RUN)  # one epoch: 4 steps
    remote = pretrain(data="s3://shard-and-train/coco/train", out=str(tmp_path / "remote"), **RUN)
    assert loss_rows(tmp_path / "remote") == loss_rows(tmp_path / "local") and len(loss_rows(tmp_path / "local")) == 4
    a, b = read_checkpoint(local), read_checkpoint(remote)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert list((tmp_path / "cache" / "shards").glob("*/chunks/**/*.bin"))  # whole chunks, in mls's cache


def upload_shards(client, tmp_path: Path, bucket: str, n: int) -> tuple[str, str]:
    """``n`` images sharded locally and copied into a new bucket with boto3 (as `aws s3 sync` would): the
    local shard set and its URL."""
    write_folder(tmp_path / "imgs", n)
    shards = tmp_path / "shards"
    shard(str(tmp_path / "imgs"), out=str(shards), workers=1)
    new_bucket(client, bucket)
    for path in shards.iterdir():
        client.upload_file(str(path), bucket, f"set/{path.name}")
    return str(shards), f"s3://{bucket}/set"


def test_a_run_from_a_bucket_resumed_mid_epoch_equals_the_uninterrupted_run(s3, tmp_path, monkeypatch):
    """Stopped in the middle of epoch 1 (4 steps an epoch), the images read by two worker processes."""
    shards, url = upload_shards(s3, tmp_path, "resume", 32)
    common = {**RUN, "epochs": 2, "workers": 2}
    straight = pretrain(data=shards, out=str(tmp_path / "straight"), **common)

    def crash(module, outputs, batch, batch_idx):
        if module.global_step == 6:
            raise Crash

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(PretrainModule, "on_train_batch_end", crash, raising=False)
        pretrain(data=url, out=str(tmp_path / "split"), **common)
    resumed = pretrain(data=url, out=str(tmp_path / "split"), resume="auto", **common)
    assert_resumed_like_straight(straight, resumed, 8)


@pytest.mark.distributed
def test_two_ranks_read_disjoint_halves_of_a_bucket(s3, tmp_path):
    """2 gloo processes, each with 2 loader workers, reading the bucket: the global batches of one process
    reading the local shards, each image once."""
    shards, url = upload_shards(s3, tmp_path, "ranks", 35)  # 4 global batches of 8 + 3 dropped
    assert_two_ranks_split_one_rank_s_batches(tmp_path, url, shards)


def pretrain_error(monkeypatch, data: str, out: Path) -> str:
    """The message the `mls pretrain --data DATA` command ends with (one line, checked)."""
    monkeypatch.setattr(sys, "argv", ["mls", "pretrain", "--data", data, "--out", str(out), "--max-steps", "1",
                                      *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]])
    monkeypatch.delenv("MLS_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        console()
    message = str(stop.value.code)
    assert message.startswith("mls: error: ") and "\n" not in message, message
    assert not (out / "last.ckpt").exists()
    return message


def test_what_the_store_refuses_ends_as_one_line_naming_it(s3, tmp_path, monkeypatch):
    _, url = upload_shards(s3, tmp_path, "refusals", 8)
    endpoint = s3.meta.endpoint_url
    assert pretrain_error(monkeypatch, "s3://no-such-bucket/set", tmp_path / "a") == (
        f"mls: error: no bucket 'no-such-bucket' at the S3 endpoint {endpoint}")
    assert pretrain_error(monkeypatch, "s3://refusals/elsewhere", tmp_path / "b") == (
        "mls: error: s3://refusals/elsewhere is not a shard set made by `mls shard`: no mls_shards.json in it")
    s3.delete_object(Bucket="refusals", Key="set/index.json")
    assert pretrain_error(monkeypatch, url, tmp_path / "c") == (
        f"mls: error: {url} is not a shard set made by `mls shard`: no index.json in it")

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys: none is known
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
    assert pretrain_error(monkeypatch, url, tmp_path / "d") == (
        f"mls: error: the S3 endpoint {endpoint} refused the credentials for s3://refusals (403): check "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may read the bucket")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    assert pretrain_error(monkeypatch, url, tmp_path / "e") == (
        "mls: error: no credentials to read s3://refusals: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE) for it")
