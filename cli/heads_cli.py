"""`heads`: train, evaluate, score, ablate, fuse and submit SAOA / SAP / baseline heads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import click
from click.core import ParameterSource

from cli.common import (
    LEARNING_RATE,
    MOMENTUM,
    POSITIVE,
    SEED,
    WEIGHT_DECAY,
    GuardedGroup,
    IntList,
    debug_option,
    domain_errors,
    removed_on_early_failure,
    run_outputs,
)
from cli.heads_experiments import ablate, fuse, submit
from cli.heads_runs import inspect, runs

if TYPE_CHECKING:
    from heads.trainer import TrainConfig


def model_option() -> click.Option:
    """``--model``: a choice among the registered heads, each described in the help."""
    from heads.models import get_head, list_heads

    described = "; ".join(f"{name}: {get_head(name).description}" for name in list_heads())
    return click.Option(["--model"], type=click.Choice(list_heads()), default="saoa", show_default=True,
                        help=f"Registered head. {described}.")


def switch_options() -> list[click.Option]:
    """One option per switch of the registered heads (``heads.models.all_switches``), help from the registry.

    A boolean switch is a ``--name/--no-name`` pair, any other a ``--name VALUE`` of its default's
    type; unset options stay None and are not passed, so each head keeps its own defaults.
    """
    from heads.models import all_switches

    options = []
    for switch in all_switches().values():
        flag = switch.name.replace("_", "-")
        text = switch.help[:1].upper() + switch.help[1:]
        help_text = f"Switch of {', '.join(switch.heads)} (default {switch.default!r}): {text}"
        if isinstance(switch.default, bool):
            options.append(click.Option([f"--{flag}/--no-{flag}", switch.name], default=None, help=help_text))
        else:
            kind = type(switch.default) if switch.default is not None else str
            options.append(click.Option([f"--{flag}", switch.name], type=kind, default=None, help=help_text))
    return options


class RegistryCommand(click.Command):
    """A command whose ``--model`` and head switch options are read from the head registry when it runs,
    so a head registered after import (a plugin) is offered too."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        help_option = self.get_help_option(ctx)
        fixed = [p for p in params if p is not help_option]
        taken = {opt for p in fixed for opt in p.opts + p.secondary_opts}
        model, switches = model_option(), switch_options()
        for option in switches:
            clash = taken.intersection(option.opts + option.secondary_opts)
            if clash:
                raise click.ClickException(f"a head switch clashes with the option {', '.join(sorted(clash))} "
                                           f"of `heads {self.name}`; rename the switch")
        arguments = [p for p in fixed if isinstance(p, click.Argument)]
        options = [p for p in fixed if not isinstance(p, click.Argument)]
        return arguments + [model] + options + switches + ([help_option] if help_option is not None else [])


def switches_from(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Switches the user set explicitly (a head refuses switches it does not have)."""
    from heads.models import all_switches

    given = {name: kwargs.pop(name, None) for name in all_switches()}
    return {name: value for name, value in given.items() if value is not None}


@click.group(name="heads", cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featstore")
@debug_option
def main(debug: bool) -> None:
    """Train and compare SAOA / SAP / baseline heads on a feature store, in seconds."""


# `heads train` parameters that are not TrainConfig fields: where and how to run, not what.
RUN_PARAMS = ("store", "out", "resume", "progress", "config", "tensorboard", "half_checkpoint", "keep_resume_state")


def make_train_config(params: Mapping[str, Any]) -> TrainConfig:
    """The `heads.trainer.TrainConfig` of parsed `heads train` parameters (also what the demo runs).

    Args:
        params: the `train` command's parameters by name, as click parses them (or as
            `cli.common.command_params` fills them in).
    Returns:
        A `TrainConfig`: every parameter but those of `RUN_PARAMS` (STORE, ``--out``, ``--resume``,
        ``--progress``, ``--config`` and the outputs' options, which say where and how to run, not
        what), the head switches the user set gathered in ``switches``.
    """
    from heads.trainer import TrainConfig

    values = {name: value for name, value in params.items() if name not in RUN_PARAMS}
    switches = switches_from(values)
    return TrainConfig(switches=switches, **values)


def recorded_train_config(params: Mapping[str, Any], given: set[str]) -> tuple[TrainConfig, Path]:
    """`heads train --config RUN/config.json`: the recorded run's settings, overridden by the options given.

    Args:
        params: the `train` command's parameters (``config`` set).
        given: the names of the parameters set on the command line (the overrides).
    Returns:
        The config and the store: STORE when given, else the one the run recorded (relative paths
        taken from its folder).
    """
    import dataclasses

    from heads.trainer import run_config

    recorded, store = run_config(params["config"])
    overrides = {name: value for name, value in params.items()
                 if name in given and name in {f.name for f in dataclasses.fields(recorded)}}
    # Another head keeps none of the recorded head's switches, only those given.
    kept = recorded.switches if overrides.get("model", recorded.model) == recorded.model else {}
    config = dataclasses.replace(recorded, **overrides, switches={**kept, **switches_from(dict(params))})
    return config, Path(params["store"]) if params.get("store") is not None else store


@main.command(cls=RegistryCommand)
@click.argument("store", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
@click.option("--config", "config", type=click.Path(exists=True, path_type=Path),
              help="Reproduce a run: its RUN/config.json (or RUN); every option given on the command line "
                   "overrides the recorded value, STORE defaults to the run's store.")
@click.option("--train", "train_split", help="Named training split, e.g. epic55-lfb-train.")
@click.option("--train-where", help="DuckDB WHERE over segments selecting training segments.")
@click.option("--val", "val_split", help="Named validation split, e.g. epic55-lfb-val.")
@click.option("--val-where", help="DuckDB WHERE over segments selecting validation segments.")
@click.option("--epochs", default=15, show_default=True, type=click.IntRange(min=0), help="Passes over the training set.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Segments per step.")
@click.option("--lr", default=1e-4, show_default=True, type=LEARNING_RATE, help="SGD learning rate (before --lr-steps).")
@click.option("--lr-steps", default="", type=IntList(),
              help="Comma-separated epochs at which the lr drops x0.1 (e.g. 11).")
@click.option("--momentum", default=0.9, show_default=True, type=MOMENTUM, help="SGD momentum.")
@click.option("--weight-decay", default=1e-4, show_default=True, type=WEIGHT_DECAY, help="SGD weight decay.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the head's weights and the batch order.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--action-prior", type=click.Choice(["lfb", "none"]), default="lfb", show_default=True,
              help="Action re-weighting by P(noun | verb) counted on the training selection.")
@click.option("--dataset", type=click.Choice(["epic55", "epic100"]), help="Default: from the store.")
@click.option("--meta-dir", type=click.Path(exists=True, file_okay=False), help="Class / many-shot / tail lists.")
@click.option("--memory-budget-gb", type=POSITIVE, help="Stream from LMDB when preloading would need more.")
@click.option("--views", type=click.Choice(["random", "first"]),
              help="Temporal views of a store built with --views K (docs/views.md): random reads one view of each "
                   "training segment per epoch, drawn from (seed, epoch, uid); first reads view 0 only (the store "
                   "as without views). Validation reads view 0 either way [default: random on a store with views].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@run_outputs
@domain_errors
def train(**params: Any) -> None:
    """Train one head on a store and write a run directory.

    --model and the head switches (--gating/--no-gating, ...) come from the head registry. Examples:

    \b
        heads train STORE --model saoa --train epic55-lfb-train --val epic55-lfb-val --out runs/saoa
        heads train STORE --model saoa --no-gating --train epic55-lfb-train --val epic55-lfb-val --out runs/saoa-no-gating
        torchrun --nproc_per_node 2 --no-python heads train STORE --model saoa --train epic55-lfb-train --out runs/saoa-ddp
        heads train --config runs/saoa/config.json --out runs/saoa-again
        heads train --config runs/saoa/config.json --seed 1 --out runs/saoa-seed1
    """
    from heads.trainer import train as train_run

    if params["config"] is not None:
        context = click.get_current_context()
        given = {name for name in params
                 if context.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
        config, store = recorded_train_config(params, given)
    elif params["store"] is None:
        raise click.UsageError("give STORE, or --config RUN/config.json to reproduce a run")
    else:
        config, store = make_train_config(params), params["store"]
    with removed_on_early_failure(params["out"], "run"):
        metrics = train_run(store, params["out"], config, resume=params["resume"], progress=params["progress"],
                            tensorboard=params["tensorboard"], half_checkpoint=params["half_checkpoint"],
                            keep_resume_state=params["keep_resume_state"])
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"run written to {params['out']}", err=True)


@main.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--where", help="DuckDB WHERE over the run's store (default: the run's validation selection).")
@click.option("--split", help="Named split instead of --where.")
@click.option("--device", help="Default: the run's device.")
@click.option("--store", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The run's store, when it is no longer where the run recorded it (default: the recorded one).")
@click.option("--per-class", type=click.Path(file_okay=False, path_type=Path),
              help="Also write per-class accuracy, the confusion matrices (CSV and PNG) and a per-participant "
                   "table to this folder; the mean class accuracies join the printed metrics.")
@click.option("--meta-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Class lists for --per-class's names (default: the run's, else its store's annotation folder).")
@domain_errors
def eval_cmd(run: Path, where: str | None, split: str | None, device: str | None, store: Path | None,
             per_class: Path | None, meta_dir: Path | None) -> None:
    """Evaluate a trained run on a selection of its store; prints the metrics as JSON.

    Examples:

    \b
        heads eval runs/saoa
        heads eval runs/saoa --where "participant_id = 'P30'"
        heads eval runs/saoa --store /data/moved/store --per-class runs/saoa/per-class
    """
    from heads.trainer import run_evaluation

    evaluation = run_evaluation(run, where=where, split=split, device=device, store_path=store)
    metrics = dict(evaluation.metrics)
    if per_class is not None:
        from heads.class_report import class_names, write_class_report

        labels = evaluation.labels
        names = class_names(evaluation.scoring.dataset, meta_dir=meta_dir or evaluation.meta_dir,
                            annotations=evaluation.annotations)
        report = write_class_report(per_class, evaluation.predictions, labels.verb.numpy(), labels.noun.numpy(),
                                    participants=labels.table.column("participant_id").to_pylist(), names=names,
                                    prior=evaluation.scoring.prior)
        metrics.update({k: v for k, v in report.summary.items() if "_mean_class_" in k})
        click.echo(f"per-class tables written to {per_class} (names from {names.source})", err=True)
    click.echo(json.dumps(metrics, indent=2))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--store", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Store to predict on (default: the run's own).")
@click.option("--where", help="DuckDB WHERE selecting the segments.")
@click.option("--split", help="Named split, e.g. epic55-test-s1.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="predictions.parquet to write.")
@click.option("--device", help="Default: the run's device.")
@domain_errors
def predict(run: Path, store: Path | None, where: str | None, split: str | None, out: Path, device: str | None) -> None:
    """Write a trained run's logits for any selection (unlabelled test sets included).

    Example:

    \b
        heads predict runs/saoa --store test_store --split epic55-test-s1 --out s1.parquet
    """
    from heads.predictions import write_predictions
    from heads.trainer import predict_selection

    preds, labels = predict_selection(run, store_path=store, where=where, split=split, device=device)
    write_predictions(out, preds, verb_labels=labels.verb.numpy(), noun_labels=labels.noun.numpy())
    click.echo(f"{len(preds.uids)} predictions written to {out}")


@main.command()
@click.argument("predictions", type=click.Path(exists=True, path_type=Path))
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Annotation file (CSV or pkl) with the labels of the predicted segments.")
@click.option("--dataset", type=click.Choice(["epic55", "epic100"]), help="Default: from the annotation file.")
@click.option("--meta-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Class, many-shot, tail and unseen lists (default: the annotation file's folder).")
@click.option("--action-prior-from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training annotations to count the LFB action prior on; the scored segments' rows are "
                   "left out (a segment never informs its own prior).")
@click.option("--train", "train_split",
              help="Named training split of --annotations the predictions' model was trained on (e.g. "
                   "epic55-lfb-train): many-shot actions are restricted to its pairs (default: a run "
                   "directory's own training selection; none for a bare predictions file).")
@click.option("--train-where", help="DuckDB WHERE over the --annotations columns selecting that training split.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics.json object.")
@click.option("--store", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="When PREDICTIONS is a run directory: its store, if no longer where the run recorded it.")
@click.option("--per-class", type=click.Path(file_okay=False, path_type=Path),
              help="Also write per-class accuracy, the confusion matrices (CSV and PNG, class names from "
                   "--meta-dir or the annotations) and a per-participant table to this folder.")
@domain_errors
def score(predictions: Path, annotations: Path, dataset: str | None, meta_dir: Path | None,
          action_prior_from: Path | None, train_split: str | None, train_where: str | None, as_json: bool,
          store: Path | None, per_class: Path | None) -> None:
    """Score any predictions Parquet (uid, verb_logits, noun_logits) on the segments it contains.

    Many-shot actions are the official list intersected with the pairs of the training split when it
    is known (--train / --train-where, or PREDICTIONS being a run directory); metrics.json's
    many_shot_actions says which list was used. Examples:

    \b
        heads score runs/saoa/predictions.parquet --annotations EPIC_train_action_labels.csv
        heads score val.parquet --annotations EPIC_train_action_labels.csv --train epic55-lfb-train --json
        heads score runs/saoa --annotations EPIC_train_action_labels.csv --per-class runs/saoa/per-class
    """
    from heads.evaluation import prior_note
    from heads.metric_registry import get_metric, metric_values
    from heads.scoring import score_file

    metrics = score_file(predictions, annotations, dataset=dataset, meta_dir=meta_dir,
                         action_prior_from=action_prior_from, train_split=train_split, train_where=train_where,
                         store_path=store, per_class=per_class)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        for key, value in metric_values(metrics).items():
            click.echo(f"{key:<22} {get_metric(key).format(value):>7}")
        for key, value in metrics.items():
            if "_mean_class_" in key:  # --per-class
                click.echo(f"{key:<22} {value:>7.2f}")
    if "action_prior" in metrics:
        click.echo(prior_note(metrics["action_prior"]), err=True)


# Commands of their own modules (imported above: a misspelt or broken module is an error).
for command in (ablate, fuse, submit, runs, inspect):
    main.add_command(command)


if __name__ == "__main__":
    main()
