"""The plan: grid points -> ensembles -> devices. Placement is data: print it, test it.

Points of one architecture and width form ensembles (they share the batch), as large as
`max_members` and the device's memory allow. Ensembles go to the device with the least work that
has room (largest first). What does not fit at once runs in a later wave on the same devices.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from dictsweep.config import SweepSpec
from dictsweep.errors import InputError
from dictsweep.sae import ARCHITECTURES, Member, grid_keys
from dictsweep.sae.transcoder import is_transcoder
from dictsweep.train.actor import EnsembleSpec
from dictsweep.train.target_l0 import point_member
from dictsweep.train.zero import ZERO_ARCHITECTURES

# the one memory model (single-device members and ZeRO workers alike), in fp32 floats
BYTES_PER_FLOAT = 4
STATE_COPIES = 4  # fp32 weights, gradients, Adam's two moments (ZeRO partitions all but the weights)
ACTIVATION_COPIES = 4  # [rows, n_latents] tensors alive in a step: pre-activations, latents, their gradients
TRANSIENT_WEIGHT_COPIES = 3  # ZeRO, [d, n] in a step: the forward's [W_enc; bias], [W_dec, norms], one full gradient
PARTITIONED_COPIES = 4  # ZeRO, per parameter, split over workers: gradient, fp32 master, Adam's two moments


@dataclass(frozen=True)
class GridPoint:
    """One SAE of the sweep."""

    architecture: str
    n_latents: int
    lr: float
    seed: int
    l1_coef: float | None = None
    k: int | None = None
    target_l0: float | None = None  # set: l1_coef is steered to this L0 during training
    matryoshka_prefixes: tuple[float, ...] | None = None  # matryoshka_batchtopk: fractions of n_latents

    @property
    def name(self) -> str:
        """The point's name from what the grid set: a steered key (l1_coef under an L0 target) is not
        part of it, so a finished SAE that carries its final coefficient keeps its name."""
        declared = ARCHITECTURES[self.architecture].hyperparameters
        steered = {p.replaces for p in declared if p.replaces is not None and getattr(self, p.key) is not None}
        sparsity = "-".join(
            parameter.name_part(getattr(self, parameter.key))
            for parameter in declared
            if getattr(self, parameter.key) is not None and parameter.key not in steered
        )
        return f"{self.architecture}-n{self.n_latents}-{sparsity}-lr{self.lr:.3g}-s{self.seed}"

    def member(self) -> Member:
        return point_member(self.params())

    def params(self) -> dict:
        """MLflow params and index.json keys: every architecture's grid keys (None where not its own), and
        a key that replaces another only where it is set."""
        settings = {
            key: getattr(self, key)
            for key, parameter in grid_keys().items()
            if parameter.replaces is None or getattr(self, key) is not None
        }
        return {
            "architecture": self.architecture,
            "n_latents": self.n_latents,
            **settings,
            "lr": self.lr,
            "seed": self.seed,
        }


# Gao et al. 2024's lr = 2e-4 * sqrt(2^14 / n_latents) times this: at our budget of 1M tokens in 1024
# steps, 3x recovers more synthetic features for topk (mean max cosine 0.82 -> 0.90 at d_model 256,
# 1024 latents) and relu (0.81 -> 0.975 at 9x) alike; relu stays at 3x, as at 9x its L0 drifted
# 12-17% above its targets on MiniLM once the coefficient was held
LR_SCALE = 3.0


def default_lr(architecture: str, n_latents: int) -> float:
    """The learning rate of an SAE whose grid sets none (any architecture): Gao et al.'s width
    scaling, `LR_SCALE` * 2e-4 * sqrt(2^14 / n_latents); at most 1e-2."""
    return min(1e-2, LR_SCALE * 2e-4 * math.sqrt(2**14 / n_latents))


def applying_keys(grid, architecture: str) -> list:
    """The grid keys that set `architecture`'s points: its declared ones, where a key the grid sets takes
    the place of the key it replaces (e.g. target_l0 that of l1_coef; topk has neither)."""
    declared = ARCHITECTURES[architecture].hyperparameters
    replaced = {p.replaces for p in declared if p.replaces is not None and getattr(grid, p.key) is not None}
    return [p for p in declared if p.key not in replaced and (p.replaces is None or getattr(grid, p.key) is not None)]


def grid_points(spec: SweepSpec) -> list[GridPoint]:
    """Every point of the grid: per architecture, the product of the keys that apply to it."""
    grid, points = spec.grid, []
    for architecture in grid.architecture:
        declared = applying_keys(grid, architecture)
        for n_latents in grid.n_latents:
            for values in itertools.product(*(getattr(grid, parameter.key) for parameter in declared)):
                settings = {parameter.key: parameter.kind(value) for parameter, value in zip(declared, values)}
                for lr in grid.lr or [default_lr(architecture, n_latents)]:
                    for seed in grid.seed:
                        for parameter in declared:
                            if problem := parameter.problem(settings[parameter.key], n_latents):
                                raise InputError(problem)
                        points.append(GridPoint(architecture, n_latents, lr, seed, **settings))
    names = [point.name for point in points]
    if len(set(names)) != len(names):
        raise InputError("grid: the same point appears twice (repeated values in a grid list?)")
    return points


def zero_bytes_per_worker(
    d_model: int, n_latents: int, batch_rows: int, workers: int, stage: int, offload: bool
) -> int:
    """Device memory of one worker training one fp32 SAE under ZeRO `stage` (2 or 3) on B/G rows.

    Both stages hold the full weights while they compute (ZeRO-3 gathers the one layer an SAE is;
    its resting partition comes on top), plus the forward's concatenated weight copies and one
    unreduced gradient; the gradient partition, fp32 master and moments are split G ways and, with
    `offload`, live on the host instead.
    """
    if stage not in (2, 3) or workers < 1:
        raise ValueError(f"stage must be 2 or 3 and workers >= 1, got stage {stage}, workers {workers}")
    params = 2 * d_model * n_latents + n_latents + d_model
    partition = math.ceil(params / workers)
    resting = partition if stage == 3 else 0
    partitioned = 0 if offload else PARTITIONED_COPIES * partition
    activations = ACTIVATION_COPIES * math.ceil(batch_rows / workers) * n_latents
    return BYTES_PER_FLOAT * (
        params + resting + TRANSIENT_WEIGHT_COPIES * d_model * n_latents + partitioned + activations
    )


def member_bytes(d_model: int, n_latents: int, batch_rows: int, d_out: int = 0, skip: bool = False) -> int:
    """Memory one SAE needs while training: fp32 weights, gradients, Adam state, batch activations; a
    transcoder's (`d_out`: its target's width) encoder reads d_model, its decoder writes d_out (and a
    skip transcoder holds W_skip [d_model, d_out])."""
    d_out = d_out or d_model
    params = (d_model + d_out) * n_latents + n_latents + d_out + skip * d_model * d_out
    return BYTES_PER_FLOAT * (STATE_COPIES * params + ACTIVATION_COPIES * batch_rows * n_latents)


def point_bytes(point: GridPoint, d_model: int, batch_rows: int, d_target: int) -> int:
    """`member_bytes` of a grid point: a transcoder's decoder writes the dataset's target (`d_target` wide)."""
    if not is_transcoder(point.architecture):
        return member_bytes(d_model, point.n_latents, batch_rows)
    return member_bytes(d_model, point.n_latents, batch_rows, d_target, ARCHITECTURES[point.architecture].skip)


@dataclass
class EnsemblePlan:
    architecture: str
    n_latents: int
    points: list[GridPoint]
    memory_bytes: int
    flops_per_row: int  # forward + backward matmul FLOPs per row, all members

    def spec(self) -> EnsembleSpec:
        return EnsembleSpec(
            self.architecture,
            self.n_latents,
            tuple(p.member() for p in self.points),
            tuple(p.name for p in self.points),
        )


@dataclass
class TrainerPlan:
    device: str  # "cuda" or "cpu"
    index: int
    memory_bytes: int
    ensembles: list[EnsemblePlan] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return sum(e.memory_bytes for e in self.ensembles)

    @property
    def flops_per_row(self) -> int:
        return sum(e.flops_per_row for e in self.ensembles)


@dataclass
class ZeroPlan:
    """One SAE too large for a device, trained data-parallel with DeepSpeed ZeRO over `workers`."""

    point: GridPoint
    device: str
    workers: int
    stage: int
    offload: bool
    memory_bytes: int  # per worker


@dataclass
class Plan:
    d_model: int
    batch_rows: int
    waves: list[list[TrainerPlan]]
    zero: list[ZeroPlan] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # point name -> why it fits nowhere

    @property
    def points(self) -> list[GridPoint]:
        return [p for wave in self.waves for t in wave for e in t.ensembles for p in e.points] + [
            z.point for z in self.zero
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple]:
        """(wave, device, ensemble, SAEs, memory GB, share of device) per ensemble, for printing."""
        rows = []
        for wave_index, wave in enumerate(self.waves):
            for trainer in wave:
                for ensemble in trainer.ensembles:
                    rows.append(
                        (
                            wave_index,
                            f"{trainer.device}:{trainer.index}",
                            f"{ensemble.architecture} n={ensemble.n_latents}",
                            len(ensemble.points),
                            round(ensemble.memory_bytes / 2**30, 2),
                            round(ensemble.memory_bytes / trainer.memory_bytes, 3),
                        )
                    )
        for name in self.unplaced:
            rows.append(("-", "none", name, 1, "-", "fits nowhere"))
        for zero in self.zero:
            rows.append(
                (
                    "zero",
                    f"{zero.device}:0-{zero.workers - 1}",
                    f"{zero.point.architecture} n={zero.point.n_latents} ZeRO-{zero.stage}"
                    + (" offload" if zero.offload else ""),
                    1,
                    round(zero.memory_bytes / 2**30, 2),
                    "per worker",
                )
            )
        return rows


def make_plan(
    points: list[GridPoint],
    d_model: int,
    batch_rows: int,
    device: str,
    n_devices: int,
    device_memory_bytes: int,
    max_members: int,
    headroom: float,
    zero: str = "auto",
    zero_stage: int = 2,
    zero_offload: bool = False,
    zero_workers: int = 0,
    d_target: int = 0,
) -> Plan:
    """Pack points into ensembles and ensembles onto `n_devices` devices, in as few waves as fit;
    points that fit no device alone (or all, with zero="always") go to DeepSpeed ZeRO when it trains
    their architecture (ZERO_ARCHITECTURES), else they are unplaced with the reason."""
    budget = int(device_memory_bytes * (1 - headroom))
    groups: dict[tuple, list[GridPoint]] = {}
    zero_plans, unplaced = [], {}
    for point in points:
        per_member = point_bytes(point, d_model, batch_rows, d_target)
        try:
            if point.architecture not in ZERO_ARCHITECTURES and (zero == "always" or per_member > budget):
                raise InputError(
                    f"needs {per_member / 2**30:.1f} GiB, more than a {device} device's budget of "
                    f"{budget / 2**30:.1f} GiB, and ZeRO trains only {', '.join(ZERO_ARCHITECTURES)}; lower "
                    "n_latents or train.batch_rows"
                )
            if zero == "always" or (per_member > budget and zero == "auto"):
                zero_plans.append(
                    plan_zero(
                        point, d_model, batch_rows, device, n_devices, budget, zero_stage, zero_offload, zero_workers
                    )
                )
                continue
            if per_member > budget:
                raise InputError(
                    f"needs {per_member / 2**30:.1f} GiB, more than a {device} device's budget of "
                    f"{budget / 2**30:.1f} GiB; lower n_latents or train.batch_rows, or allow resources.zero"
                )
        except InputError as error:
            unplaced[point.name] = str(error)
            continue
        else:
            groups.setdefault((point.architecture, point.n_latents), []).append(point)
    ensembles = []
    for (architecture, n_latents), members in groups.items():
        per_member = point_bytes(members[0], d_model, batch_rows, d_target)
        d_out = d_target if is_transcoder(architecture) else d_model
        size = max(1, min(max_members, budget // per_member))
        count = math.ceil(len(members) / size)
        for chunk in range(count):  # near-equal ensembles rather than full ones and a remainder
            part = members[chunk::count]
            ensembles.append(
                EnsemblePlan(
                    architecture, n_latents, part, per_member * len(part), 5 * (d_model + d_out) * n_latents * len(part)
                )
            )
    ensembles.sort(key=lambda e: (-e.flops_per_row, e.architecture, e.n_latents))
    waves: list[list[TrainerPlan]] = []
    for ensemble in ensembles:
        for wave in waves:
            roomy = [t for t in wave if t.used_bytes + ensemble.memory_bytes <= budget]
            if roomy:
                min(roomy, key=lambda t: (t.flops_per_row, t.index)).ensembles.append(ensemble)
                break
        else:
            wave = [TrainerPlan(device, index, device_memory_bytes) for index in range(n_devices)]
            wave[0].ensembles.append(ensemble)
            waves.append(wave)
    return Plan(d_model, batch_rows, [[t for t in wave if t.ensembles] for wave in waves], zero_plans, unplaced)


def plan_zero(
    point: GridPoint,
    d_model: int,
    batch_rows: int,
    device: str,
    n_devices: int,
    budget: int,
    stage: int,
    offload: bool,
    workers: int,
) -> ZeroPlan:
    """The fewest ZeRO workers (up to the devices there are) whose per-worker memory fits."""
    choices = [workers] if workers else [g for g in range(1, max(n_devices, 1) + 1) if batch_rows % g == 0]
    for count in choices:
        needed = zero_bytes_per_worker(d_model, point.n_latents, batch_rows, count, stage, offload)
        if needed <= budget or workers:
            return ZeroPlan(point, device, count, stage, offload, needed)
    needed = zero_bytes_per_worker(d_model, point.n_latents, batch_rows, choices[-1], stage, offload)
    raise InputError(
        f"needs {needed / 2**30:.1f} GiB per worker even with ZeRO-{stage} over {choices[-1]} "
        f"{device} devices (budget {budget / 2**30:.1f} GiB): ZeRO gathers an SAE's whole layer for "
        f"each step; try {'' if offload else 'resources.zero_offload, '}a smaller train.batch_rows "
        f"or n_latents"
    )


def plan_from_dict(data: dict) -> Plan:
    """A plan saved with `Plan.to_dict` (plan.json in the sweep's storage), for resuming."""
    waves = [
        [
            TrainerPlan(
                t["device"],
                t["index"],
                t["memory_bytes"],
                [
                    EnsemblePlan(
                        e["architecture"],
                        e["n_latents"],
                        [GridPoint(**p) for p in e["points"]],
                        e["memory_bytes"],
                        e["flops_per_row"],
                    )
                    for e in t["ensembles"]
                ],
            )
            for t in wave
        ]
        for wave in data["waves"]
    ]
    zero = [
        ZeroPlan(GridPoint(**z["point"]), z["device"], z["workers"], z["stage"], z["offload"], z["memory_bytes"])
        for z in data.get("zero", [])
    ]
    return Plan(data["d_model"], data["batch_rows"], waves, zero)


def plan_sweep(spec: SweepSpec, d_model: int, device: str, n_devices: int, memory: int, d_target: int = 0) -> Plan:
    """The plan of a spec's grid on `n_devices` devices of `memory` bytes each (`d_target`: a transcoder
    dataset's target width)."""
    resources = spec.resources
    return make_plan(
        grid_points(spec),
        d_model,
        spec.train.batch_rows,
        device,
        n_devices,
        memory,
        resources.max_members,
        resources.memory_headroom,
        resources.zero,
        resources.zero_stage,
        resources.zero_offload,
        resources.zero_workers,
        d_target,
    )
