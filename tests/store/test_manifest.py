import json

import pytest

from dictsweep.errors import DatasetError, InputError
from dictsweep.store.manifest import FORMAT, Manifest

from .conftest import edit_manifest


def test_load_round_trips_and_keeps_extra_keys(small_dataset):
    prefix, _, _ = small_dataset
    edit_manifest(prefix, lambda m: m.update(writer="someone else's tool"))
    manifest = Manifest.load(str(prefix))
    assert manifest.format == FORMAT and manifest.d_model == 4 and manifest.dtype == "float32"
    assert manifest.n_rows == 25 and [s.rows for s in manifest.shards] == [10, 10, 5]
    assert manifest.model_extra == {"writer": "someone else's tool"}
    assert json.loads(manifest.to_json())["writer"] == "someone else's tool"


def test_missing_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(
        DatasetError, match=f"{tmp_path} has no manifest.json: not a dictsweep dataset, or its writer did not finish"
    ) as caught:
        Manifest.load(str(tmp_path))
    assert isinstance(caught.value, InputError) and caught.value.exit_code == 2


def test_invalid_json_and_non_object(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json is not valid JSON"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="manifest.json: expected a JSON object, found list"):
        Manifest.load(str(tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m.update(format="dictsweep.activations/2"),
            "field 'format': found 'dictsweep.activations/2', this version of dictsweep reads only "
            "'dictsweep.activations/1'",
        ),
        (lambda m: m.update(dtype="float64"), "field 'dtype': Input should be 'float16', 'bfloat16' or 'float32'"),
        (lambda m: m.pop("d_model"), "field 'd_model': Field required"),
        (lambda m: m.update(d_model=0), "field 'd_model': Input should be greater than 0"),
        (lambda m: m.update(d_model="4"), "field 'd_model': Input should be a valid integer"),
        (lambda m: m.update(n_rows=26), "field 'n_rows': 26, but the train shards hold 25 rows"),
        (lambda m: m["shards"][1].pop("sha256"), r"field 'shards\[1\].sha256': Field required"),
        (lambda m: m["shards"][1].update(blake3="00ff"), r"field 'shards\[1\].blake3': String should match"),
        (
            lambda m: m["eval_shards"][0].update(path="../elsewhere.arrow"),
            r"field 'eval_shards\[0\].path': '../elsewhere.arrow' must be a path relative to the dataset prefix",
        ),
        (lambda m: m.update(ground_truth="/etc/features.safetensors"), "field 'ground_truth': '/etc/features"),
    ],
)
def test_each_bad_field_is_named(small_dataset, change, message):
    prefix, _, _ = small_dataset
    edit_manifest(prefix, change)
    with pytest.raises(DatasetError, match=f"{prefix}/manifest.json: {message}"):
        Manifest.load(str(prefix))
