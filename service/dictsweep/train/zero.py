"""One SAE too large for one device, trained data-parallel with DeepSpeed ZeRO across Ray Train workers.

The workers read the sweep's stream in optimizer steps of S rows (`train.step_rows`: the whole
batch, or consecutive parts of it): worker w of G trains on rows [w * S/G, (w + 1) * S/G) of every
step (`WorkerSlices`), so the G workers together see exactly the steps a single-device trainer
takes. Each worker's loss is the mean over its S/G rows and DeepSpeed averages gradients over
workers: the step's mean. The step is the single-device one (`EnsembleTrainer.optimizer_step` in
`loop.py`); `ZeroTrainer` overrides its hooks with DeepSpeed's terms:

- Adam: DeepSpeed's optimizer config with `torch_adam` and `fused` (torch's fused kernel, as in
  `StackedAdam`), also with optimizer offload (the moments live on the host, stepped by torch);
  the scheduled lr (`lr_factor`) is written into the param groups before each step.
- Clipping: DeepSpeed's `gradient_clipping` divides by (norm + 1e-6) / clip, as `clip_divisor`.
- Unit-norm decoders (topk): a hook on W_dec drops each row's radial gradient component before
  DeepSpeed reduces it (`constrain_gradients`: linear, so per worker then averaged is the same);
  after the step each row is renormalised in the model weights and in ZeRO's fp32 master copy
  (stage 2 from the full weight every worker holds; stage 3 from each worker's partition, with one
  all-reduce of the row norms).
- Firing statistics: fire counts are summed over workers every step, so dead masks (AuxK) and
  resampling (relu) see the global batch; resampling gathers the batch and the reconstructions and
  every worker draws the same rows from the member's own generator.
- AuxK (topk) weighs its error by a ratio of batch variances, the one term that is no row mean:
  each worker rescales its AuxK loss to the global batch's ratio (one small all-reduce).
- Training metrics are the global batch's (one all-reduce per step with the fire counts); with an L0
  target, the controller steers the coefficient by that batch's L0, alike on every worker.

For one SAE (one layer) ZeRO-3 gathers the whole dictionary for each forward and backward, so its
peak is stage 2's: what ZeRO saves is the gradients, the fp32 master copy and Adam's moments
(the planner's memory model, `sweep/plan.py` `zero_bytes_per_worker`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn import functional as F

from dictsweep.config import TrainConfig
from dictsweep.errors import InputError, RunError
from dictsweep.sae import ARCHITECTURES, build_ensemble
from dictsweep.sae.ensemble import Ensemble, EnsembleOutput
from dictsweep.sae.metrics import fvu_from_moments, variance, variance_from_moments
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.order import StreamOrder
from dictsweep.stream.slices import WorkerSlices
from dictsweep.train.evaluate import Evaluator, export_member
from dictsweep.train.loop import STEP_METRICS, BatchStatistics, EnsembleTrainer, lr_factor
from dictsweep.train.target_l0 import point_member

TORCH_EXTENSIONS_DIR = "~/.cache/dictsweep/torch_extensions"  # DeepSpeed's JIT-built ops (~60 s to build once)
CPU_WORKER_RESOURCES = {"CPU": 0.5}  # a placement token: CPU workers share the node's cores
# losses that are means over rows (topk's AuxK weight is corrected to the global batch); batchtopk
# selects its latents over the whole batch, which no worker holds
ZERO_ARCHITECTURES = ("relu", "topk")


def train_zero(
    dataset_uri: str,
    point: dict,
    train: TrainConfig,
    stream_seed: int,
    shuffle_shards: int,
    workers: int,
    *,
    storage_uri: str,
    name: str,
    metadata: dict,
    stage: int = 2,
    offload: bool = False,
    use_gpu: bool = False,
) -> dict:
    """Train one grid point (architecture, n_latents, l1_coef, k, lr, seed) on `workers` Ray Train
    workers with ZeRO `stage`, evaluate it on the eval shards and export it to
    `<storage_uri>/dictionaries/<name>/`.

    Returns {"metrics": eval metrics, "uri": the dictionary folder, "metric_history": [{"tokens",
    "metrics"}, ...]} (training metrics every `train.log_every_tokens`, over the global batches).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if stage not in (2, 3):
        raise InputError(f"ZeRO stage must be 2 or 3, got {stage}")
    if point["architecture"] not in ZERO_ARCHITECTURES:
        raise InputError(
            f"{name}: ZeRO data-parallel training supports {', '.join(ZERO_ARCHITECTURES)}, not "
            f"{point['architecture']!r}; train it on one device"
        )
    rows = train.rows_per_step(ARCHITECTURES[point["architecture"]].budget_steps)
    if workers < 1 or rows % workers:
        raise InputError(
            f"{name}: its optimizer steps of {rows} rows (train.step_rows) must split evenly over {workers} ZeRO workers"
        )
    total_steps = train.tokens // train.batch_rows * (train.batch_rows // rows)  # the steps of one device's batches
    if total_steps == 0:
        raise InputError(f"train.tokens ({train.tokens}) is less than one batch ({train.batch_rows} rows)")
    dataset = ActivationDataset.open(dataset_uri)
    if dataset.n_eval_rows < train.batch_rows:
        raise InputError(
            f"{dataset_uri}: the eval split has {dataset.n_eval_rows} rows, fewer than one batch "
            f"of {train.batch_rows}; final metrics need held-out rows"
        )
    result_uri = fs.join(storage_uri, "zero", name, "result.json")
    fs.remove(result_uri)
    config = {
        "dataset_uri": dataset_uri,
        "point": dict(point),
        "train": train,
        "stream_seed": stream_seed,
        "shuffle_shards": shuffle_shards,
        "total_steps": total_steps,
        "step_rows": rows,
        "stage": stage,
        "offload": offload,
        "use_gpu": use_gpu,
        "input_scale": math.sqrt(dataset.d_model / dataset.mean_sq_norm()),
        "storage_uri": storage_uri,
        "name": name,
        "metadata": metadata,
        "result_uri": result_uri,
    }
    scaling = ScalingConfig(
        num_workers=workers, use_gpu=use_gpu, resources_per_worker=None if use_gpu else CPU_WORKER_RESOURCES
    )
    with tempfile.TemporaryDirectory(prefix="dictsweep-zero-") as ray_storage:  # results come back via result_uri
        trainer = TorchTrainer(
            zero_worker,
            train_loop_config=config,
            scaling_config=scaling,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=f"zero-{name}", storage_path=ray_storage),
        )
        try:
            trainer.fit()
        except Exception as error:  # Ray wraps the worker's exception; keep its text for people
            raise RunError(f"ZeRO training of {name} ({workers} workers, stage {stage}) failed: {error}") from error
    return json.loads(fs.read_text(result_uri))


# -- on each worker -----------------------------------------------------------------------------------
def zero_worker(config: dict) -> None:
    """The per-worker function: train, evaluate, export (rank 0), write the result (rank 0)."""
    use_gpu = config["use_gpu"]
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed first picks its accelerator
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(TORCH_EXTENSIONS_DIR))
    import deepspeed
    import ray.train.torch

    deepspeed.utils.logger.setLevel("WARNING")
    # DeepSpeed calls torch.distributed's deprecated *_into_tensor names hundreds of times a run
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # joins Ray Train's process group
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    train, point = config["train"], config["point"]
    dataset = ActivationDataset.open(config["dataset_uri"])
    member = point_member(point)  # with an L0 target, the controller steers it on the global batch's L0
    kernel = train.kernel if train.kernel in ("bmm", "loop") else "bmm"  # one member: the kernels agree
    ensemble = build_ensemble(
        point["architecture"], dataset.d_model, point["n_latents"], [member], kernel=kernel, decode=train.decode
    )
    ensemble.input_scale.fill_(config["input_scale"])
    trainer = ZeroTrainer(ensemble, train, config["total_steps"], config["stage"], config["offload"], device)

    rows = config["step_rows"]  # the stream read in optimizer steps: the same rows in the same order as its batches
    order = StreamOrder(
        [s.rows for s in dataset.shards("train")], rows, config["shuffle_shards"], config["stream_seed"]
    )
    batches = WorkerSlices(dataset, "train", order, trainer.rank, trainer.world)
    history = []
    for step in range(trainer.total_steps):
        trainer.step(batches.batch(step))
        tokens = (step + 1) * rows
        if tokens // train.log_every_tokens != step * rows // train.log_every_tokens:
            history.append({"tokens": tokens, "metrics": trainer.log_metrics()})

    eval_order = StreamOrder(
        [s.rows for s in dataset.shards("eval")], train.batch_rows, 1, config["stream_seed"], shuffle=False
    )
    eval_steps = min(train.eval_tokens, dataset.n_eval_rows) // train.batch_rows
    metrics = trainer.evaluate(WorkerSlices(dataset, "eval", eval_order, trainer.rank, trainer.world), eval_steps)
    with trainer.full_weights():
        if trainer.rank == 0:
            done = export_member(
                ensemble,
                0,
                trainer.firing.log10_frequency()[0],
                metrics,
                config["metadata"],
                config["storage_uri"],
                config["name"],
                dataset.ground_truth(),
                {"zero": {"stage": config["stage"], "workers": trainer.world, "offload": config["offload"]}},
            )
            fs.write_text(config["result_uri"], json.dumps({**done, "metric_history": history}))
    torch.distributed.barrier()  # nobody leaves (and tears down the group) before rank 0 has written


class ZeroTrainer(EnsembleTrainer):
    """One single-member ensemble in a DeepSpeed ZeRO engine: `EnsembleTrainer.optimizer_step` over the
    workers' slices of each step, its hooks in DeepSpeed's terms and its statistics over the step's rows."""

    def __init__(
        self, ensemble: Ensemble, config: TrainConfig, total_steps: int, stage: int, offload: bool, device: torch.device
    ):
        import deepspeed

        self.stage, self.device = stage, device
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.lr = float(ensemble.lr[0])
        ds_config = deepspeed_config(
            config, self.lr, ensemble.d_model * ensemble.n_latents, self.world, stage, offload, device.type == "cuda"
        )
        if stage == 3:  # partition the weights before the engine sees them: the full SAE never goes to the device
            deepspeed.zero.Init(module=ensemble, config_dict_or_path=ds_config)
            for name, buffer in ensemble.named_buffers():
                setattr(ensemble, name, buffer.to(device))
        self.engine, *_ = deepspeed.initialize(
            model=ensemble, model_parameters=list(ensemble.parameters()), config=ds_config
        )
        self.ensemble, self.forward = ensemble, self.engine
        if ensemble.unit_norm_decoder:
            ensemble.W_dec.register_hook(self.project_decoder_gradient)
        self.check_dead_every_step = True  # on GPUs too: AuxK from the step latents die
        self.start(config, total_steps)  # after the engine: it may have moved the buffers the L0 controller steers

    def step(self, batch: Tensor) -> None:
        """One optimizer step on this worker's slice of its rows: the worker loop reads the stream in steps."""
        self.optimizer_step(batch)

    def losses(self, x: Tensor, out: EnsembleOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        """The step metrics, with AuxK's weight that of the global batch."""
        losses = super().losses(x, out, dead_mask)  # [1] each
        if dead_mask is not None:  # AuxK's weight is a ratio of batch variances: make it the global batch's
            scale = self.auxk_variance_correction(x, out)
            losses["loss"] = out.loss + out.aux_loss * (scale - 1)
            losses["aux_loss"] = out.aux_loss * scale
        return losses

    def apply(self, loss: Tensor) -> None:
        """DeepSpeed's backward (gradients averaged over workers) and step at the scheduled lr (clipped
        in DeepSpeed), then the decoder constraint."""
        self.engine.backward(loss.sum())
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(self.step_count, self.total_steps, self.config)
        self.engine.step()
        self.constrain_decoder()

    @torch.no_grad()
    def auxk_variance_correction(self, x: Tensor, out: EnsembleOutput) -> Tensor:
        """`TopKEnsemble.auxk_from` weighs its error by var(x) / var(x - sae_out) over the batch; each
        worker used its slice's: this factor (a constant, like the weight) swaps in the global batch's."""
        residual = x - out.sae_out[0].float()  # [B/G, d_model]
        local = variance(x) / variance(residual)
        sums = torch.cat([x.sum(0), x.pow(2).sum().view(1), residual.sum(0), residual.pow(2).sum().view(1)]).double()
        torch.distributed.all_reduce(sums)
        rows, d_model = len(x) * self.world, self.ensemble.d_model
        x_variance = variance_from_moments(sums[:d_model], sums[d_model], rows)
        residual_variance = variance_from_moments(sums[d_model + 1 : -1], sums[-1], rows)
        return (x_variance / residual_variance).float() / local

    # -- the unit-norm decoder -----------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_gradient(self, grad: Tensor) -> Tensor:
        """`Ensemble.constrain_gradients` on this worker's W_dec gradient, before DeepSpeed reduces it
        (ZeRO-3 has the weight gathered while its gradient is computed)."""
        weight = self.ensemble.W_dec
        rows = weight / weight.norm(dim=-1, keepdim=True)
        return grad - (grad * rows).sum(-1, keepdim=True) * rows

    @torch.no_grad()
    def constrain_decoder(self) -> None:
        """`Ensemble.constrain_weights` after the step, in the model weights and ZeRO's fp32 master."""
        if not self.ensemble.unit_norm_decoder:
            return
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

        weight = self.ensemble.W_dec
        if self.stage != 3:  # every worker holds the full weight
            self.ensemble.constrain_weights()
            safe_set_full_fp32_param(weight, weight.detach())
            return
        master = safe_get_local_fp32_param(weight)  # this worker's partition of the flat weight
        first = self.rank * weight.ds_tensor.numel()  # its position in the flat weight
        valid = max(0, min(len(master), weight.ds_numel - first))  # the last partition is padded
        d_model = self.ensemble.d_model
        head = first % d_model
        sq_norms = torch.zeros(self.ensemble.n_latents, device=master.device)  # [n_latents]
        if valid:  # whole rows of the partition's span, zero-padded where a row continues on a neighbour
            rows = F.pad(master[:valid].float(), (head, -(head + valid) % d_model)).view(-1, d_model)
            first_row = first // d_model
            sq_norms[first_row : first_row + len(rows)] = rows.pow(2).sum(-1)
        torch.distributed.all_reduce(sq_norms)  # a row split between two partitions gets both halves
        if valid:
            rows = rows / sq_norms[first_row : first_row + len(rows)].sqrt().unsqueeze(-1)
            master = master.clone()
            master[:valid] = rows.flatten()[head : head + valid]
            safe_set_local_fp32_param(weight, master)
            weight.ds_tensor.copy_(master)

    # -- statistics over the global batch ------------------------------------------------------
    @torch.no_grad()
    def reduce(self, x: Tensor, fire_counts: Tensor, losses: dict[str, Tensor]) -> BatchStatistics:
        """Fire counts `[1, n]` and step metrics `[1]` of the global batch (one all-reduce).

        The metrics are row means, so the mean over equal slices is the global mean; fvu divides
        the global mse by the global batch's variance, from summed first and second moments.
        """
        names = [name for name in STEP_METRICS if name != "fvu"]
        means = torch.stack([losses[name].detach().double()[0] for name in names])  # [metrics]
        packed = torch.cat([fire_counts[0].double(), means, x.double().sum(0), x.double().pow(2).sum().view(1)])
        torch.distributed.all_reduce(packed)
        n_latents, rows = self.ensemble.n_latents, len(x) * self.world
        fire_counts = packed[:n_latents].float().view(1, -1)
        values = dict(zip(names, (packed[n_latents : n_latents + len(names)] / self.world).float().view(-1, 1)))
        x_sum, x_sq_sum = packed[n_latents + len(names) : -1], packed[-1]
        values["fvu"] = fvu_from_moments(values["mse"], x_sum, x_sq_sum, rows)
        return BatchStatistics(fire_counts, values, rows)

    def replace_dead(self, dead: Tensor, x: Tensor, out: EnsembleOutput) -> dict[str, Tensor]:
        """As `EnsembleTrainer.replace_dead`, on the gathered global batch: every worker makes the
        same draws, writes the same weights (and ZeRO's fp32 master) and zeroes the same moments."""
        x_all = gather_rows(x)  # [B, d_model], in global batch order
        sae_out_all = gather_rows(out.sae_out.detach()[0]).unsqueeze(0)  # [1, B, d_model]
        with self.full_weights(modified=True):
            changed = self.ensemble.resample(dead, x_all, sae_out_all, self.generators)
        self.engine.optimizer.refresh_fp32_params()  # the master copy takes the new weights
        for name, mask in changed.items():
            self.reset_moments(getattr(self.ensemble, name), mask)
        return changed

    def init_decoder_bias(self, x: Tensor) -> None:
        """As `EnsembleTrainer.init_decoder_bias`, from the gathered global batch (every worker the same)."""
        with self.full_weights(modified=True):
            self.ensemble.init_decoder_bias(gather_rows(x))  # [B, d_model], every worker's rows
        self.engine.optimizer.refresh_fp32_params()  # the master copy takes the new bias

    def reset_moments(self, param: torch.nn.Parameter, mask: Tensor) -> None:
        """Zero both Adam moments of `param` where `mask` (broadcastable to it) is True."""
        from deepspeed import utils

        for key in ("exp_avg", "exp_avg_sq"):
            state = utils.safe_get_full_optimizer_state(param, key).masked_fill(mask, 0.0).flatten()
            if self.stage != 3:
                utils.safe_set_full_optimizer_state(param, state, key)
                continue
            size = param.ds_tensor.numel()  # ZeRO-3 partitions are equal and padded at the end
            padded = F.pad(state, (0, size * self.world - len(state)))
            utils.safe_set_local_optimizer_state(param, padded[self.rank * size : (self.rank + 1) * size], key)

    def full_weights(self, modified: bool = False):
        """A context in which every worker holds the full weights (ZeRO-3 gathers them; with
        `modified`, rank 0's changes are kept)."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(
            list(self.ensemble.parameters()), modifier_rank=0 if modified else None
        )

    def log_metrics(self) -> dict[str, float]:
        """`EnsembleTrainer.log_metrics` of the one member."""
        return {name: values[0] for name, values in super().log_metrics().items()}

    def state_dict(self) -> dict:
        raise NotImplementedError("ZeRO training keeps no checkpoint")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("ZeRO training keeps no checkpoint")

    @torch.no_grad()
    def evaluate(self, slices: WorkerSlices, steps: int) -> dict[str, float]:
        """`Evaluator` metrics over `steps` eval batches, each worker on its slice, sums all-reduced."""
        evaluator = Evaluator(self.ensemble)
        for step in range(steps):
            evaluator.add(self.scale(slices.batch(step)))
        for name in Evaluator.SUMS:
            torch.distributed.all_reduce(getattr(evaluator, name))
        evaluator.rows *= self.world
        return evaluator.results()[0]


def gather_rows(rows: Tensor) -> Tensor:
    """Every worker's `[B/G, ...]` rows, concatenated in rank order: the global batch."""
    parts = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def deepspeed_config(
    config: TrainConfig, lr: float, largest_param: int, workers: int, stage: int, offload: bool, pin_memory: bool
) -> dict:
    """DeepSpeed's config for one SAE: fp32 ZeRO `stage`, torch's fused Adam, the clip, B/G rows per worker."""
    zero = {"stage": stage, "reduce_bucket_size": largest_param, "allgather_bucket_size": largest_param}
    if stage == 3:  # no weight stays gathered between steps: the decoder renorm writes the partitions only
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    return {
        "train_batch_size": config.batch_rows,
        "train_micro_batch_size_per_gpu": config.batch_rows // workers,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # with offload too: torch's Adam, the single-device arithmetic
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": lr,
                "betas": [config.adam_beta1, config.adam_beta2],
                "eps": config.adam_eps,
                "weight_decay": 0.0,
                "adam_w_mode": False,
                "torch_adam": True,
                "fused": True,
            },
        },
        "steps_per_print": 2**31 - 1,
    }
