"""What a sweep produced, typed: one SAE's result, one baseline's, the sweep's; and the one list of
eval metrics that index.json, `dictsweep pull` and the CLI's results table read."""

from __future__ import annotations

from dataclasses import dataclass, field

from dictsweep.sweep.plan import GridPoint, Plan


@dataclass(frozen=True)
class Metric:
    """One eval metric of an SAE: its key in the SAE's metrics (`eval/<key>` in MLflow), its name in
    index.json, its results-table header and how the table writes it."""

    key: str
    index_name: str | None  # in every index.json entry (null where not measured); None: only where measured
    header: str | None  # None: not in the results table
    format: str  # format spec of a table cell
    shown_when_measured: bool = False  # a table column only when some SAE has the metric


# in the results table's order; short headers so that the table fits 80 columns
METRICS = (
    Metric("l0", "l0", "l0", ".2f"),
    Metric("fvu", "fvu", "fvu", ".4f"),
    Metric("mse", "mse", None, ".4g"),
    Metric("dead_fraction", "dead_fraction", "dead", ".3f"),
    Metric("mmcs_ground_truth", "mmcs_ground_truth", "mmcs_gt", ".3f", shown_when_measured=True),  # synthetic data
    Metric("loss_recovered", None, "loss_rec", ".3f", shown_when_measured=True),  # spliced into the model
    Metric("sae_top_1_test_accuracy", None, "probe", ".3f", shown_when_measured=True),  # evaluation.probing
)
INDEX_METRICS = tuple(metric for metric in METRICS if metric.index_name is not None)


@dataclass
class SAEResult:
    """A finished SAE: its grid point, eval metrics, dictionary folder, MLflow run and plot."""

    point: GridPoint
    metrics: dict
    uri: str
    run_id: str
    plot: str | None = None


@dataclass
class BaselineResult:
    """A fitted baseline dictionary (`sweep.baselines.fit_baselines`), with its MLflow run once logged."""

    name: str
    kind: str
    k: int
    n_atoms: int
    metrics: dict
    uri: str
    fit: dict
    run_id: str = ""


@dataclass
class SweepResult:
    """What a sweep produced: per point its metrics (finished) or its error (failed)."""

    plan: Plan
    finished: dict[str, SAEResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why
    selected: set[str] = field(default_factory=set)
    export_dir: str = ""
    tracking_uri: str = ""
    tracking_url: str = ""  # where a person sees the sweep's runs table (MLflow UI)
    stream: dict = field(default_factory=dict)
    baselines: list[BaselineResult] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # name -> why it was or was not selected
    ruled_out: set[str] = field(default_factory=set)  # not selected whatever their neighbours (band, bounds)
    band: tuple[float, float] | None = None  # the selection's L0 band
    seeds: list[dict] = field(default_factory=list)  # grid points of several seeds: means, intervals (`sweep.seeds`)
    splice_tokens: int = 0  # positions the spliced evaluation scored
    # trainer key -> where it ran: each start or restart, {"node", "position" (step), "restored"}
    placements: dict[str, list[dict]] = field(default_factory=dict)
    resumable: set[str] = field(default_factory=set)  # failed with a lost node: `--resume` continues them
