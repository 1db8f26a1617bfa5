"""What the CLI shows: the plan and results tables, benchmark results, and the package's log
records on stderr through rich. Tables fit 80 columns (short headers, no vertical rules)."""

from __future__ import annotations

import typer


def print_plan(plan) -> None:
    """The placement plan as a table."""
    from rich.console import Console
    from rich.table import Table

    from rich import box

    table = Table(
        title=f"plan: d_model={plan.d_model}, batch_rows={plan.batch_rows}, "
        f"{len(plan.points) + len(plan.unplaced)} SAEs",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )  # as the results: 80 columns
    for column in ("wave", "device", "ensemble", "SAEs", "memory GiB", "device share"):
        table.add_column(column, justify="left" if column in ("device", "ensemble") else "right", no_wrap=True)
    for row in plan.rows():
        table.add_row(*map(str, row))
    console = Console()
    console.print(table)
    for name, why in sorted(plan.unplaced.items()):
        console.print(f"[red]fits nowhere[/red] {name}: {why}")


def print_sweep(result, experiment: str | None = None) -> None:
    """The results table (fits 80 columns: short headers, no vertical rules), the selection reasons
    under it (they wrap), then where the dictionaries and the MLflow runs are."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from dictsweep.sweep.results import METRICS
    from dictsweep.track import sweep_url

    finished = result.finished.values()
    shown = [
        metric
        for metric in METRICS
        if metric.header is not None
        and (not metric.shown_when_measured or any(metric.key in r.metrics for r in finished))
    ]
    uses_k = {r.point.k is not None for r in finished}
    sparsity = "l1/k" if len(uses_k) > 1 else "k" if uses_k == {True} else "l1_coef"
    reasons = {name: why for name, why in (getattr(result, "why", None) or {}).items() if why}
    table = Table(title="sweep results (eval shards)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("arch", "n_latents", sparsity, *(metric.header for metric in shown), "sel"):
        table.add_column(column, justify="left" if column == "arch" else "right", no_wrap=True)
    rows = sorted(
        finished, key=lambda r: (r.point.architecture, r.point.n_latents, r.point.l1_coef or 0, r.point.k or 0)
    )

    def number(value, format: str) -> str:
        return "-" if value is None else f"{value:{format}}"

    for r in rows:
        point, metrics = r.point, r.metrics
        cells = [
            point.architecture,
            str(point.n_latents),
            number(point.l1_coef, "g") if point.k is None else str(point.k),
            *(number(metrics.get(metric.key), metric.format) for metric in shown),
        ]
        table.add_row(*cells, "*" if point.name in result.selected else "")
    console = Console()
    console.print(table)
    for name, why in sorted(reasons.items()):
        console.print(f"{'*' if name in result.selected else ' '} {name}: {why}")
    for name, why in sorted(result.failed.items()):
        console.print(f"[red]failed[/red] {name}: {why.splitlines()[0][:300]}")
    if result.seeds:
        from dictsweep.sweep.seeds import describe

        for row in result.seeds:
            console.print(describe(row))
    band = f" inside L0 [{result.band[0]:.3g}, {result.band[1]:.3g}]" if result.band else ""
    console.print(
        f"dictionaries: {result.export_dir} (index.json; * = selected{band}; each SAE's why: index.json, "
        f"MLflow tag dictsweep.why)"
    )
    ui = result.tracking_uri
    url = result.tracking_url or (sweep_url(ui, experiment) if experiment else None)
    if ui.startswith("sqlite:"):
        console.print(f"MLflow: mlflow ui --backend-store-uri {ui}", soft_wrap=True)
    console.print(f"MLflow runs: {url or ui}", soft_wrap=True)


EVALUATION_COLUMNS = (  # (metric key, header, format): the `dictsweep eval` table, 80 columns
    ("l0", "l0", ".1f"),
    ("explained_variance", "expl_var", ".3f"),
    ("cossim", "cossim", ".3f"),
    ("l2_ratio", "l2_ratio", ".3f"),
    ("kl_div_score", "kl_score", ".3f"),
    ("ce_loss_score", "ce_score", ".3f"),
    ("sae_top_1_test_accuracy", "probe_k1", ".3f"),
    ("mean_absorption_fraction_score", "absorb", ".3f"),
)


def print_evaluation(summary: dict[str, dict], out: str) -> None:
    """`dictsweep eval`'s table: per dictionary the headline metrics (every one is in eval.json)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    columns = [c for c in EVALUATION_COLUMNS if any(c[0] in metrics for metrics in summary.values())]
    table = Table(title="evaluation (SAEBench definitions)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("dictionary", no_wrap=False)
    for _, header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for name, metrics in sorted(summary.items()):
        table.add_row(name, *("-" if key not in metrics else f"{metrics[key]:{fmt}}" for key, _, fmt in columns))
    console = Console()
    console.print(table)
    console.print(f"every metric, SAEBench's core JSON and the probing results: {out}/eval.json, {out}/<name>/")


def print_result(result: dict, as_json: bool, title: str) -> None:
    """A benchmark's result: one JSON object, or a two-column table."""
    import json

    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in result.items():
        table.add_row(name, f"{value:,.3f}" if isinstance(value, float) else str(value))
    Console().print(table)


def show_logs() -> None:
    """What the package logs (`logging`: notes and warnings) reaches stderr through rich, once per process."""
    import logging

    from rich.console import Console
    from rich.logging import RichHandler

    logger = logging.getLogger("dictsweep")
    if not any(isinstance(handler, RichHandler) for handler in logger.handlers):
        logger.addHandler(RichHandler(console=Console(stderr=True), show_time=False, show_path=False))
        logger.setLevel(logging.INFO)
