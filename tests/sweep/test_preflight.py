"""What a sweep needs is checked in seconds, before Ray starts: storage credentials and buckets, the
tracking server, the dataset's manifest, the spec against the dataset. One line each, exit 2."""

import pytest

from dictsweep.config import SweepSpec
from dictsweep.errors import InputError
from dictsweep.store.synth import SynthConfig, synth_dataset
from dictsweep.sweep.preflight import preflight

from tests.conftest import free_port

SYNTH = {"d_model": 8, "n_features": 16, "active": 2, "rows": 2048, "eval_rows": 512, "shard_rows": 1024}


def spec(tmp_path, **sections) -> SweepSpec:
    raw = {
        "name": "early",
        "data": {"uri": str(tmp_path / "data")},
        "grid": {"n_latents": [16]},
        "train": {"tokens": 1024, "batch_rows": 256, "eval_tokens": 512},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "storage": {"dir": str(tmp_path / "sweeps")},
        "export": {"dir": str(tmp_path / "dictionaries")},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return SweepSpec.model_validate(raw)


@pytest.fixture
def local_data(tmp_path):
    synth_dataset(str(tmp_path / "data"), SynthConfig(**SYNTH))
    return str(tmp_path / "data")


@pytest.fixture
def no_credentials(monkeypatch, s3_server, tmp_path):
    """The S3 server is there, but this process has no credentials for it (and no instance role)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_good_spec_passes_and_opens_its_dataset(tmp_path, local_data):
    dataset = preflight(spec(tmp_path))
    assert dataset.d_model == 8 and dataset.n_eval_rows == 512


def test_s3_dataset_without_credentials(tmp_path, bucket, no_credentials):
    with pytest.raises(InputError) as raised:
        preflight(spec(tmp_path, data={"uri": f"s3://{bucket}/data"}))
    message = str(raised.value)
    assert message.startswith(f"data.uri: s3://{bucket}/data: no storage credentials") and "\n" not in message


@pytest.mark.parametrize("field", ["storage", "export"])
def test_storage_in_a_bucket_that_does_not_exist(tmp_path, local_data, s3_server, field):
    with pytest.raises(
        InputError, match=f"^{field}.dir: s3://no-such-bucket-x/p: the bucket 'no-such-bucket-x' does not exist"
    ):
        preflight(spec(tmp_path, **{field: {"dir": "s3://no-such-bucket-x/p"}}))


def test_dataset_that_does_not_exist(tmp_path):
    with pytest.raises(InputError, match="data has no manifest.json"):
        preflight(spec(tmp_path))


def test_tracking_server_that_does_not_answer(tmp_path, local_data):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InputError, match=f"^tracking.uri {uri}: no answer within 5 s"):
        preflight(spec(tmp_path, tracking={"uri": uri}))


def test_tracking_server_that_answers(tmp_path, local_data, mlflow_server):
    assert preflight(spec(tmp_path, tracking={"uri": mlflow_server})).d_model == 8


def test_sqlite_store_in_a_missing_folder(tmp_path, local_data):
    with pytest.raises(InputError, match="the folder .*/nowhere does not exist"):
        preflight(spec(tmp_path, tracking={"uri": f"sqlite:///{tmp_path}/nowhere/mlflow.db"}))


@pytest.mark.parametrize(
    "train, words",
    [
        ({"tokens": 100}, "train.tokens (100) is less than one batch"),
        ({"eval_tokens": 128}, "train.eval_tokens is 128"),
    ],
)
def test_too_few_rows_for_one_batch(tmp_path, local_data, train, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        preflight(spec(tmp_path, train=train))


def test_storage_that_does_not_exist_yet_in_a_bucket_is_fine(tmp_path, local_data, bucket):
    assert (
        preflight(spec(tmp_path, storage={"dir": f"s3://{bucket}/not/yet"}, export={"dir": f"s3://{bucket}"})).d_model
        == 8
    )
