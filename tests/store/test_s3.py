"""s3:// datasets against a real S3 API server (moto) through s3fs: written, read, verified, and
the storage's own failures reported by name: corrupt objects, missing buckets, denied access,
transient errors retried."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from dictsweep.errors import DatasetError, InputError
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.synth import SynthConfig, synth_dataset

SMALL = SynthConfig(d_model=8, n_features=16, active=2, rows=3000, eval_rows=500, shard_rows=1000, seed=4)


def test_synth_to_s3_reads_back_like_local(tmp_path, bucket):
    uri = f"s3://{bucket}/toy"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dictsweep.cli",
            "synth",
            "--out",
            uri,
            "--d-model",
            "8",
            "--n-features",
            "16",
            "--active",
            "2",
            "--rows",
            "3000",
            "--eval-rows",
            "500",
            "--shard-rows",
            "1000",
            "--seed",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    synth_dataset(str(tmp_path / "local"), SMALL)
    remote, local = ActivationDataset.open(uri), ActivationDataset.open(str(tmp_path / "local"))
    assert remote.manifest.shards == local.manifest.shards  # same bytes, same checksums
    for index in range(3):
        assert torch.equal(remote.read_shard(index), local.read_shard(index))
    torch.testing.assert_close(remote.ground_truth(), local.ground_truth())


def test_corrupted_object_is_named(bucket):
    uri = f"s3://{bucket}/toy"
    synth_dataset(uri, SMALL)
    shard = fs.join(uri, "train/00001.arrow")
    data = bytearray(fs.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    fs.write_bytes(shard, bytes(data))
    dataset = ActivationDataset.open(uri)
    dataset.read_shard(0)  # the others are fine
    with pytest.raises(DatasetError, match="train/00001.arrow.*blake3 mismatch"):
        dataset.read_shard(1)


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        ActivationDataset.open("s3://no-such-bucket/data")
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        synth_dataset("s3://no-such-bucket/data", SMALL)


@pytest.fixture
def strict_s3(monkeypatch):
    """A second S3 server that checks credentials: one user with a key and no permissions."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    iam = boto3.client(
        "iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1"
    )
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    yield key
    server.terminate()
    server.wait()


def test_denied_access_and_wrong_credentials(strict_s3, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", strict_s3["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", strict_s3["SecretAccessKey"])
    with pytest.raises(InputError, match=r"s3://data/acts.*access denied.*AWS_ACCESS_KEY_ID") as denied:
        ActivationDataset.open("s3://data/acts")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(InputError, match="access denied") as wrong:
        synth_dataset("s3://data/acts", SMALL)
    for error in (denied.value, wrong.value):
        assert strict_s3["SecretAccessKey"] not in str(error) and "not-the-secret" not in str(error)


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to the S3 server, but answers every third request with 503 (as S3 does when it
    throttles) and drops every fifth connection without an answer."""

    def __init__(self, upstream: str):
        self.upstream, self.count, self.failures = upstream, 0, 0
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # so that `Expect: 100-continue` uploads get their answer

            def handle_one_request(handler):
                handler.close_connection = True
                super().handle_one_request()

            def forward(handler):
                with lock:
                    self.count += 1
                    count = self.count
                length = int(handler.headers.get("Content-Length") or 0)
                body = handler.rfile.read(length) if length else None
                if count % 5 == 0:
                    self.failures += 1
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return
                if count % 3 == 0:
                    self.failures += 1
                    handler.send_response(503)
                    handler.send_header("Content-Length", "0")
                    handler.end_headers()
                    return
                headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "expect")}
                headers.setdefault("Content-Type", "application/octet-stream")  # not urllib's form default
                request = urllib.request.Request(
                    self.upstream + handler.path, data=body, method=handler.command, headers=headers
                )
                try:
                    with urllib.request.urlopen(request) as answer:
                        status, headers, payload = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as error:
                    status, headers, payload = error.code, error.headers, error.read()
                handler.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        handler.send_header(key, value)
                length = headers.get("Content-Length", "0") if handler.command == "HEAD" else str(len(payload))
                handler.send_header("Content-Length", length)
                handler.end_headers()
                handler.wfile.write(payload)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = forward

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_transient_errors_are_retried(bucket, monkeypatch, s3_server):
    uri = f"s3://{bucket}/flaky"
    proxy = FlakyProxy(s3_server)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        synth_dataset(uri, SMALL)
        dataset = ActivationDataset.open(uri)
        rows = sum(len(dataset.read_shard(index)) for index in range(len(dataset.shards("train"))))
    finally:
        proxy.shutdown()
    assert rows == SMALL.rows and proxy.failures >= 5  # it did fail, and nothing was lost
