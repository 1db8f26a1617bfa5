"""ZeRO data-parallel training (DeepSpeed across Ray Train workers) trains one SAE exactly as the
single-device loop does on the same global batches: same weights, eval metrics and training metrics.

Real local Ray, real DeepSpeed on CPU (gloo). The first run JIT-builds DeepSpeed's comm op into
~/.cache/dictsweep/torch_extensions (about a minute on an idle machine, once)."""

import math

import pytest
import torch

import dictsweep
from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae import build_ensemble
from dictsweep.sae.metrics import mmcs_ground_truth
from dictsweep.sae.plots import decoder_norm_stats
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.synth import SynthConfig, synth_dataset
from dictsweep.stream.order import StreamOrder
from dictsweep.sweep.plan import zero_bytes_per_worker
from dictsweep.train.evaluate import Evaluator
from dictsweep.train.loop import EnsembleTrainer
from dictsweep.train.target_l0 import point_member
from dictsweep.train.zero import train_zero

BATCH_ROWS, STEPS, STREAM_SEED, SHUFFLE_SHARDS = 128, 100, 7, 2
WEIGHT_TOLERANCE = 1e-5  # measured: at most 2.3e-6 (summation order of the gradient average and all-reduces)
METRIC_TOLERANCE = 1e-5  # measured: at most 1.2e-7
EVAL_ROWS = 2048
RELU = {"architecture": "relu", "n_latents": 32, "l1_coef": 5.0, "k": None, "lr": 3e-3, "seed": 3}
RELU_L0 = {**RELU, "l1_coef": None, "target_l0": 4.0}  # the coefficient is steered to L0 4 from 1
TOPK = {"architecture": "topk", "n_latents": 33, "l1_coef": None, "k": 2, "lr": 3e-3, "seed": 3}


@pytest.fixture(scope="module")
def dataset_uri(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zero") / "data")
    synth_dataset(
        out, SynthConfig(d_model=16, n_features=48, active=3, rows=16384, eval_rows=2048, shard_rows=4096, seed=0)
    )
    return out


def train_config(step_rows: int = BATCH_ROWS) -> TrainConfig:
    # short dead window and resampling period: relu resamples (step 25), topk trains with AuxK.
    # One optimizer step a batch unless asked: relu's default here, two steps of 64 rows, makes this
    # tiny run's resampling sensitive to summation order (a 1e-6 change of the input scale moves
    # the single-device weights by 1e-2; with 128-row steps by 1e-5)
    return TrainConfig(
        tokens=STEPS * BATCH_ROWS,
        batch_rows=BATCH_ROWS,
        step_rows=step_rows,
        lr_warmup_steps=20,
        log_every_tokens=25 * BATCH_ROWS,
        eval_tokens=EVAL_ROWS,
        dead_window_tokens=3 * BATCH_ROWS,
        auxk_window_tokens=BATCH_ROWS,  # topk starts centred on the data: few latents stay silent for long
        resample_every_tokens=25 * BATCH_ROWS,
        kernel="bmm",
        precision="fp32",
    )


def stream_batch(dataset: ActivationDataset, split: str, order: StreamOrder, index: int) -> torch.Tensor:
    """Global batch `index`, rebuilt from the shards and the stream order alone."""
    parts = []
    for piece in order.pieces(index):
        rows = torch.cat([dataset.read_shard(shard, split) for shard in piece.window.shards])
        permutation = order.row_permutation(piece.window)
        rows = rows if permutation is None else rows[torch.from_numpy(permutation)]
        parts.append(rows[piece.start : piece.stop])
    return torch.cat(parts)


def single_device(dataset_uri: str, point: dict, train: TrainConfig):
    """The reference: `EnsembleTrainer` on the same global batches, evaluated like the sweep."""
    dataset = ActivationDataset.open(dataset_uri)
    member = point_member(point)
    ensemble = build_ensemble(point["architecture"], dataset.d_model, point["n_latents"], [member], kernel="bmm")
    ensemble.input_scale.fill_(math.sqrt(dataset.d_model / dataset.mean_sq_norm()))
    trainer = EnsembleTrainer(ensemble, train, STEPS)
    order = StreamOrder([s.rows for s in dataset.shards("train")], BATCH_ROWS, SHUFFLE_SHARDS, STREAM_SEED)
    history = []
    for step in range(STEPS):
        trainer.step(stream_batch(dataset, "train", order, step))
        if (step + 1) * BATCH_ROWS % train.log_every_tokens == 0:
            history.append({name: values[0] for name, values in trainer.log_metrics().items()})
    eval_order = StreamOrder([s.rows for s in dataset.shards("eval")], BATCH_ROWS, 1, STREAM_SEED, shuffle=False)
    evaluator = Evaluator(ensemble)
    for step in range(train.eval_tokens // BATCH_ROWS):
        evaluator.add(trainer.scale(stream_batch(dataset, "eval", eval_order, step)))
    metrics = evaluator.results()[0]
    metrics.update(mmcs_ground_truth(ensemble.W_dec[0], dataset.ground_truth()))
    metrics.update(decoder_norm_stats(ensemble.W_dec[0]))
    return ensemble.member_state(0), metrics, history


def run_zero(dataset_uri: str, point: dict, workers: int, stage: int, storage: str, train: TrainConfig | None = None):
    name = f"{point['architecture']}-g{workers}-s{stage}"
    return train_zero(
        dataset_uri,
        point,
        train or train_config(),
        STREAM_SEED,
        SHUFFLE_SHARDS,
        workers,
        stage=stage,
        storage_uri=storage,
        name=name,
        metadata={"dictsweep": {"point": name}},
    )


def max_weight_diff(result: dict, reference: dict[str, torch.Tensor]) -> float:
    exported = dictsweep.load_dictionary(result["uri"])
    return max(float((getattr(exported, key) - value).abs().max()) for key, value in reference.items())


def max_metric_diff(metrics: dict, reference: dict) -> float:
    """The largest difference of the eval metrics, the L0 in whole firings: it counts activations,
    and a pre-activation within float noise of 0 on one of the 2048 eval rows may fire on one side
    only (the weights agree to WEIGHT_TOLERANCE), so one firing is forgiven."""
    assert set(metrics) == set(reference)
    diffs = {key: abs(metrics[key] - reference[key]) for key in reference}
    diffs["l0"] = max(0.0, diffs["l0"] - 1 / EVAL_ROWS)
    return max(diffs.values())


def assert_matches(result: dict, weights: dict, metrics: dict, history: list[dict]) -> None:
    assert max_weight_diff(result, weights) < WEIGHT_TOLERANCE
    assert max_metric_diff(result["metrics"], metrics) < METRIC_TOLERANCE
    assert [entry["tokens"] for entry in result["metric_history"]] == [25 * BATCH_ROWS * i for i in range(1, 5)]
    for entry, expected in zip(result["metric_history"], history):
        assert entry["metrics"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.timeout(1500)  # includes the one-time JIT build of DeepSpeed's comm op on a busy machine
def test_relu_stage2_two_workers_equal_one_worker_and_single_device(dataset_uri, tmp_path, ray_local):
    weights, metrics, history = single_device(dataset_uri, RELU, train_config())
    assert history[-1]["resampled_latents"] > 0  # the resampling path runs, over the gathered batch
    two = run_zero(dataset_uri, RELU, workers=2, stage=2, storage=str(tmp_path))
    one = run_zero(dataset_uri, RELU, workers=1, stage=2, storage=str(tmp_path))
    assert_matches(two, weights, metrics, history)
    assert_matches(one, weights, metrics, history)
    assert max_weight_diff(two, dict(dictsweep.load_dictionary(one["uri"]).named_parameters())) < WEIGHT_TOLERANCE
    exported = dictsweep.load_dictionary(two["uri"])
    assert exported.metadata["dictsweep"]["zero"] == {"stage": 2, "workers": 2, "offload": False}
    assert exported.metadata["dictsweep"]["metrics"]["fvu"] == two["metrics"]["fvu"]
    x = ActivationDataset.open(dataset_uri).read_shard(0, "eval")[:64].float()
    assert exported(x).shape == x.shape


@pytest.mark.timeout(900)
def test_relu_steered_to_an_l0_target_under_zero_equals_single_device(dataset_uri, tmp_path, ray_local):
    """Every worker's controller steers by the global batch's L0, so all hold the single device's
    coefficient; in two optimizer steps a batch (the workers read the stream in steps)."""
    train = train_config(step_rows=BATCH_ROWS // 2)
    weights, metrics, history = single_device(dataset_uri, RELU_L0, train)
    steered = history[-1]["l1_coef"]
    assert steered != pytest.approx(1.0, rel=0.05)  # the controller moved it
    result = run_zero(dataset_uri, RELU_L0, workers=2, stage=2, storage=str(tmp_path), train=train)
    assert_matches(result, weights, metrics, history)  # the history holds the steered coefficient too
    assert result["l1_coef"] == pytest.approx(steered, rel=1e-5)
    assert dictsweep.load_dictionary(result["uri"]).metadata["dictsweep"]["l1_coef"] == result["l1_coef"]


@pytest.mark.timeout(900)
def test_topk_stage3_two_workers_equal_single_device(dataset_uri, tmp_path, ray_local):
    weights, metrics, history = single_device(dataset_uri, TOPK, train_config())
    assert max(entry["aux_loss"] for entry in history) > 0  # dead latents: AuxK on the global firing counts
    result = run_zero(dataset_uri, TOPK, workers=2, stage=3, storage=str(tmp_path))
    assert_matches(result, weights, metrics, history)
    decoder = dictsweep.load_dictionary(result["uri"]).W_dec
    # renormalised in ZeRO-3 partitions (33 x 16 weights: a row straddles the two workers' halves)
    torch.testing.assert_close(decoder.norm(dim=-1), torch.ones(33))


def test_inputs_are_checked_before_any_worker_starts(dataset_uri, tmp_path):
    with pytest.raises(InputError, match="split evenly over 3"):
        train_zero(dataset_uri, RELU, train_config(), 0, 1, 3, storage_uri=str(tmp_path), name="x", metadata={})
    with pytest.raises(
        InputError, match=r"x: its optimizer steps of 64 rows \(train.step_rows\) must split evenly over 3"
    ):
        train_zero(dataset_uri, RELU, train_config(64), 0, 1, 3, storage_uri=str(tmp_path), name="x", metadata={})
    with pytest.raises(InputError, match="supports relu, topk, not 'batchtopk'"):
        train_zero(
            dataset_uri,
            {**TOPK, "architecture": "batchtopk"},
            train_config(),
            0,
            1,
            2,
            storage_uri=str(tmp_path),
            name="x",
            metadata={},
        )
    with pytest.raises(InputError, match="stage must be 2 or 3"):
        train_zero(
            dataset_uri, RELU, train_config(), 0, 1, 2, stage=1, storage_uri=str(tmp_path), name="x", metadata={}
        )


def test_zero_bytes_per_worker():
    d_model, n_latents, rows = 1024, 65536, 4096
    params = 2 * d_model * n_latents + n_latents + d_model
    weights = d_model * n_latents
    # stage 2 on 4 workers: full weights, 3 transient weight copies, 4 partitioned copies, activations of 1024 rows
    expected = 4 * (params + 3 * weights + 4 * math.ceil(params / 4) + 4 * 1024 * n_latents)
    assert zero_bytes_per_worker(d_model, n_latents, rows, 4, 2, False) == expected
    assert zero_bytes_per_worker(d_model, n_latents, rows, 4, 3, False) == expected + 4 * math.ceil(params / 4)
    offloaded = zero_bytes_per_worker(d_model, n_latents, rows, 4, 2, True)
    assert offloaded == expected - 4 * 4 * math.ceil(params / 4)
    per_workers = [zero_bytes_per_worker(d_model, n_latents, rows, g, 2, False) for g in (1, 2, 4, 8)]
    assert per_workers == sorted(per_workers, reverse=True)
    with pytest.raises(ValueError):
        zero_bytes_per_worker(d_model, n_latents, rows, 2, 1, False)
