"""L0 targets: steer each member's sparsity coefficient until its L0 sits at a target, then hold it.

A sweep that sets `grid.target_l0` (relu and jumprelu) gives each member a target instead of a
coefficient. After the sparsity warm-up, every step moves the logarithm of the member's
coefficient by `GAIN * log(batch L0 / target)`, the error clipped to +-MAX_ERROR (an integral
controller on log-coefficient, the batch L0 being the measurement), until
`train.target_l0_fraction` of the steps; from there the coefficient is held. All on the device: no
host-device sync per step. The final coefficient is the member's `l1_coef` in the export.

relu's coefficient weighs its L1 penalty. A jumprelu member with a target is penalised by
coefficient * (L0 / target - 1)^2 instead of coefficient * L0 (`JumpReLUEnsemble.l0_penalty`, the
target-L0 loss of Marks et al.'s dictionary_learning): a plain L0 penalty only ever raises the
thresholds, so once the controller overshoots (the thresholds lag the coefficient by hundreds of
steps) nothing but reconstruction lowers them again and the L0 settles far below its target.
As that penalty pulls the L0 up by itself below the target, a jumprelu coefficient only grows.
At the first step of steering (`L0Controller.first_step`) the trainer has the ensemble aim at the
targets (`Ensemble.aim_at_l0`: jumprelu sets each latent's threshold to fire on target / n_latents
of the batch's rows), so the controller starts near the target rather than at an L0 of hundreds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dictsweep.config import TrainConfig
from dictsweep.sae import member_from_params
from dictsweep.sae.ensemble import Ensemble, Member

# where a targeted member starts (training scale, E|x|^2 = d_model); jumprelu's weighs (L0 / target - 1)^2
INITIAL_COEF = {"relu": 1.0, "jumprelu": 1.0}
GAIN = 0.05  # per step; measured on synthetic data: higher oscillates while the weights catch up
MAX_ERROR = 0.3  # |log(L0 / target)| counted at most this much per step: at most x1.015 per step far from target


@dataclass(frozen=True)
class TargetedMember(Member):
    """A member whose `l1_coef` is only where it starts: the controller steers it to `target_l0`."""

    target_l0: float = 0.0


def initial_coef(architecture: str) -> float:
    """The coefficient a targeted member of `architecture` (or of its transcoder variants) starts from."""
    base = architecture.removesuffix("_transcoder").removesuffix("_skip")  # a transcoder's sparsity is its base's
    if base not in INITIAL_COEF:
        raise ValueError(f"target_l0 applies to {sorted(INITIAL_COEF)} (and their transcoders), not {architecture!r}")
    return INITIAL_COEF[base]


def point_member(params: dict) -> Member:
    """The member a grid point's params (`GridPoint.params()`) train, on any trainer: with an L0 target
    a `TargetedMember` starting at the architecture's initial coefficient, else `member_from_params`."""
    member = member_from_params(params)
    if params.get("target_l0") is None:
        return member
    return TargetedMember(
        lr=member.lr,
        seed=member.seed,
        l1_coef=initial_coef(params["architecture"]),
        target_l0=float(params["target_l0"]),
    )


class L0Controller:
    """Steers `ensemble.l1_coef` (in place) of the members with a target; the others are untouched."""

    def __init__(self, ensemble: Ensemble, config: TrainConfig, total_steps: int):
        device = ensemble.l1_coef.device
        self.coef = ensemble.l1_coef  # [K], the buffer the forward reads
        self.targets = torch.tensor(
            [getattr(m, "target_l0", 0.0) for m in ensemble.members], dtype=torch.float32, device=device
        )  # [K]; 0: no target
        self.steered = self.targets > 0  # [K]
        warmup_steps = config.l1_warmup_fraction * total_steps
        self.first_step = math.ceil(warmup_steps)  # the penalty is whole from here
        self.last_step = max(self.first_step, int(config.target_l0_fraction * total_steps))
        self.log_target = self.targets.clamp(min=1e-6).log()  # [K]
        # jumprelu's target penalty pulls the L0 up by itself below the target: a smaller coefficient
        # there would only slow that, so its coefficient only grows (while the L0 is above target)
        self.min_error = 0.0 if ensemble.architecture == "jumprelu" else -MAX_ERROR

    @classmethod
    def for_ensemble(cls, ensemble: Ensemble, config: TrainConfig, total_steps: int) -> "L0Controller | None":
        """A controller when some member has a target, else None (nothing to do per step)."""
        if not any(getattr(member, "target_l0", 0.0) > 0 for member in ensemble.members):
            return None
        return cls(ensemble, config, total_steps)

    @torch.no_grad()
    def update(self, batch_l0: Tensor, step: int) -> None:
        """After step `step` (0-based) measured `batch_l0 [K]`: move each steered coefficient."""
        if not self.first_step <= step < self.last_step:
            return
        error = (batch_l0.float().clamp(min=1e-3).log() - self.log_target).clamp(self.min_error, MAX_ERROR)  # [K]
        step_factor = (GAIN * error * self.steered).exp()  # [K]; 1 for members without a target
        self.coef.mul_(step_factor)

    def state_dict(self) -> dict:
        return {"targets": self.targets.clone()}

    def load_state_dict(self, state: dict) -> None:
        """The coefficients themselves live in the ensemble's state (its `l1_coef` buffer); check
        that the checkpoint steered the same targets."""
        if not torch.equal(state["targets"].to(self.targets.device), self.targets):
            raise ValueError(
                f"checkpoint's L0 targets {state['targets'].tolist()} differ from "
                f"this ensemble's {self.targets.tolist()}"
            )
