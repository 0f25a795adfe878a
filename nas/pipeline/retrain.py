"""The retrain stage: the searched subnets (top_k) and the baselines retrained from the
pretrained backbone on the retraining split, tested once at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nas.core.jsonio import read_json, write_json
from nas.data.decode import DecodedSplit, decode_split
from nas.families.prompted import PromptedModel
from nas.pipeline.console import say
from nas.pipeline.context import (
    base_tags,
    data_params,
    dataset_group,
    load_splits,
    split_params,
    target_splits,
)
from nas.pipeline.layout import RunLayout, searched_top
from nas.pipeline.progress import Report
from nas.pipeline.rates import retrain_method, tuned
from nas.pipeline.stage import Pairs, Stage
from nas.pipeline.tasks import RetrainTask
from nas.pipeline.trial import Trial
from nas.space.cost import added_flops
from nas.space.subnet import Subnet
from nas.spec.experiment import ExperimentSpec
from nas.tracking.candidates import subnet_params_flat
from nas.tracking.logged_model import inputs_record, log_retrained
from nas.training.evaluate import evaluate, evaluate_target
from nas.training.train import TrainConfig

#: A retraining whose loss diverges is retried at this fraction of its rate, at most this often.
RETRY_LR_FACTOR, MAX_RETRIES = 0.25, 2


def divergence(
    first: float | None, final: float, verified: float | None, factor: float = 2.0
) -> str | None:
    """Why a finished training counts as diverged (None: it does not). Against the verified
    run of the same subnet (``stages.verify``; its training loss after as many epochs, or its
    last): a final loss above
    ``factor`` times that and at least 0.5 above it; without one: a final loss above the
    first epoch's (the training made things worse)."""
    if verified is not None and math.isfinite(verified):
        if final > max(factor * verified, verified + 0.5):
            return f"final training loss {final:.4g}, against {verified:.4g} when verified"
        return None
    if first is not None and final > first:
        return f"final training loss {final:.4g}, above its first epoch's {first:.4g}"
    return None


def run_retrain(task: RetrainTask, report: Report = lambda p: None) -> dict[str, Any]:
    """Retrain one subnet from the pretrained backbone on the dataset's retraining split
    (``DatasetSpec.retrain_split``: train+val, or a few-shot protocol's K shots alone); test
    once at the end. A training that diverges (``divergence``, or a NaN loss) is started
    again at ``RETRY_LR_FACTOR`` of its rate, up to ``MAX_RETRIES`` times; the attempts are
    in ``attempts.json`` (a stopped run resumes the attempt it was in), the result and MLflow
    (a run per attempt, the diverged ones FAILED with tag ``nas.diverged``)."""
    trial = Trial.of(task, "retrain", Retrain.folder)
    if (done := trial.finished()) is not None:
        return done
    spec, ds, seed = trial.spec, trial.ds, trial.seed
    fit = ds.retrain_split
    data = load_splits(spec, ds, (fit, "test"))
    targets = load_targets(spec, ds, data[fit])  # decoded before training: a bad one stops it
    tags = _tags(trial)
    model, run_id, cfg, attempts, problem = _train_with_retries(trial, data, targets, tags, report)
    mean, std = spec.backbone.normalisation()
    test_acc = evaluate(model, data["test"], mean=mean, std=std)  # once, at the end
    scored = {n: evaluate_target(model, t, mean=mean, std=std) for n, t in targets.items()}
    model.save(trial.folder / "model")
    result = _result(trial, data, model, run_id, cfg, test_acc, scored, attempts, problem)
    if problem:  # still diverged after the retries: tested and reported, never silently
        trial.tracker.client.set_tag(run_id, "nas.diverged", problem)
        say(f"retrain {ds.key} seed {seed} {task.label}: still diverged after {MAX_RETRIES} "
            "retries")  # fmt: skip
    final = {"test_acc": test_acc, "params": result["params"], "added_flops": result["added_flops"]}
    final |= target_metrics(scored)
    if task.val_acc is not None:
        final["val_acc"] = task.val_acc
    trial.tracker.log_metrics(run_id, final)
    trial.tracker.log_artifact(run_id, trial.folder / "model", "model")
    # the same model as a LoggedModel (MLflow 3's Models view; mlflow.pyfunc.load_model)
    g = spec.space.geometry
    inputs = inputs_record(g.image_size, g.in_chans, mean, std, data[fit].class_names)
    result["mlflow_model_id"] = logged_model(
        trial.tracker, spec, run_id, trial.folder / "model", inputs, tags
    )
    return trial.finish(run_id, result)


def _tags(trial: Trial) -> dict[str, Any]:
    group = dataset_group(trial.spec, trial.ds)
    tags = base_tags(trial.spec, "retrain", trial.ds, trial.seed)
    return {**tags, "label": trial.task.label, "group": group or ""}


def _train_with_retries(
    trial: Trial,
    data: dict[str, DecodedSplit],
    targets: dict[str, DecodedSplit],
    tags: dict[str, Any],
    report: Report,
) -> tuple[PromptedModel, str, TrainConfig, list[dict[str, Any]], str | None]:
    """The attempts at the training (``attempts.json`` keeps those that diverged): the
    model, its MLflow run, its settings, the diverged attempts before it and why it still
    diverged (None: it did not)."""
    task, out = trial.task, trial.folder
    rates = tuned(trial.spec, trial.ds.key, retrain_method(trial.spec, task.label, task.role,
                                                           trial.seed))  # fmt: skip
    attempts = read_json(out / "attempts.json") if (out / "attempts.json").is_file() else []
    while True:
        cfg = trial.spec.retrain.train_config(
            lr=rates.lr * RETRY_LR_FACTOR ** len(attempts),
            weight_decay=rates.weight_decay,
            seed=trial.seed,
            module_lr=rates.module_lr,
        )
        attempt_tags = {**tags, "attempt": len(attempts)} if attempts else tags
        model, run_id, problem = _attempt(trial, data, targets, cfg, attempt_tags, report)
        if problem is None or len(attempts) >= MAX_RETRIES:
            return model, run_id, cfg, attempts, problem
        attempts.append({"lr": cfg.lr, "problem": problem, "mlflow_run_id": run_id})
        write_json(out / "attempts.json", attempts)
        trial.tracker.client.set_tag(run_id, "nas.diverged", problem)
        trial.tracker.finish(run_id, ok=False)
        (out / "state.pt").unlink(missing_ok=True)
        say(
            f"retrain {trial.ds.key} seed {trial.seed} {task.label}: diverged at lr "
            f"{cfg.lr:g} ({problem}); retrying at lr {cfg.lr * RETRY_LR_FACTOR:g}"
        )


def _result(
    trial: Trial,
    data: dict[str, DecodedSplit],
    model: PromptedModel,
    run_id: str,
    cfg: TrainConfig,
    test_acc: float,
    scored: dict[str, dict[str, Any]],
    retries: list[dict[str, Any]],
    problem: str | None,
) -> dict[str, Any]:
    """The retrained model's row of results.json (and its done.json)."""
    task, spec, fit = trial.task, trial.spec, trial.ds.retrain_split
    subnet = Subnet.from_data(task.subnet)
    return {
        "dataset": trial.ds.key,
        "seed": trial.seed,
        "label": task.label,
        "group": dataset_group(spec, trial.ds),
        "role": task.role,
        "subnet": subnet.to_data(),
        "subnet_str": subnet_text(task, subnet),
        "val_acc": task.val_acc,
        "test_acc": test_acc,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "train_split": fit,
        "train_images": len(data[fit]),
        "params": model.num_params()["modules"],
        "head_params": spec.backbone.head_params(data[fit].num_classes),
        "added_flops": added_flops(subnet, spec.space.geometry),
        "mlflow_run_id": run_id,
        "node": task.node,
        **({"retries": retries} if retries else {}),
        **({"diverged": problem} if problem else {}),
        **target_results(scored),
    }


def _attempt(
    trial: Trial,
    data: dict[str, DecodedSplit],
    targets: dict[str, DecodedSplit],
    cfg: TrainConfig,
    tags: dict[str, Any],
    report: Report,
) -> tuple[PromptedModel, str, str | None]:
    """One attempt at the retraining: the model built afresh (or resumed from state.pt), its
    MLflow run, its training; returns (model, run ID, why it diverged or None)."""
    task, fit = trial.task, trial.ds.retrain_split
    subnet = Subnet.from_data(task.subnet)
    model = trial.model(data[fit], subnet, full_finetune=task.full_finetune)
    resumed = trial.resumes()
    run_id = trial.track(
        f"retrain {task.dataset} seed {trial.seed} {task.label}"
        + (f" (attempt {tags['attempt'] + 1})" if "attempt" in tags else ""),
        tags,
        params={
            **cfg.to_dict(),
            **subnet_params_flat(subnet.to_data()),
            "subnet": subnet_text(task, subnet),
            "role": task.role,
            **split_params(data[fit], data["test"]),
            **data_params(data[fit], data["test"], *targets.values()),
            **{f"target/{name}.images": len(split) for name, split in targets.items()},
        },
        description=f"{task.label} ({task.role}): {subnet_text(task, subnet) or 'the head alone'}"
        f" retrained on {fit}, tested once on test",
        splits=(data[fit], data["test"], *targets.values()),
    )
    links = (
        ("candidate", task.candidate_run_id),
        ("search", task.search_run_id),
        ("verify", task.verify_run_id),
    )
    for key, value in links:
        if value:  # the runs this model came from, a click away in the UI
            trial.tracker.client.set_tag(run_id, f"nas.{key}_run_id", value)
    losses: list[float] = []
    if not model.trainable_parameters():  # an empty subnet on CLIP is zero-shot
        return model, run_id, None
    try:
        final = trial.fit(
            model,
            data[fit],
            cfg,
            run_id,
            report,
            label=task.label,
            watch=lambda _epoch, metrics: losses.append(metrics["train_loss"]),
        )
    except FloatingPointError as exc:  # a NaN or infinite loss
        return model, run_id, str(exc)
    if not final:  # resumed after its last epoch: it finished before the stop
        return model, run_id, None
    first = losses[0] if not resumed and losses else None
    return model, run_id, divergence(first, final["train_loss"], task.verified_loss)


def logged_model(
    tracker, spec: ExperimentSpec, run_id: str, folder: Path, inputs: dict, tags: dict
) -> str:
    """The retrain run's LoggedModel (params: the run's; metrics: its final ones)."""
    return log_retrained(
        spec.tracking_uri,
        tracker.experiment_id,
        run_id,
        folder,
        inputs,
        name=f"{tags['dataset']}-seed{tags['seed']}-{tags['label']}",
        tags={f"nas.{k}": str(tags[k]) for k in ("dataset", "seed", "label")},
    )


def subnet_text(task: RetrainTask, subnet: Subnet) -> str:
    return "full fine-tuning" if task.full_finetune else str(subnet)


def load_targets(spec: ExperimentSpec, ds, source) -> dict[str, DecodedSplit]:
    """The dataset's domain-generalisation targets, decoded (cached under <output>/cache)."""
    g = spec.backbone.geometry()
    return {
        name: decode_split(split, g.image_size, g.in_chans, spec.output / "cache")
        for name, split in target_splits(spec, ds, source).items()
    }


def target_results(scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A results row's target fields: ``targets`` (name -> the usual protocol's accuracy:
    restricted to the target's own classes where it holds only some of the source's, else
    over all), ``targets_all_classes`` (those subset targets over every class) and
    ``target_classes`` (how many classes each target holds)."""
    if not scored:
        return {}
    return {
        "targets": {n: s["all"] if s["own"] is None else s["own"] for n, s in scored.items()},
        "targets_all_classes": {n: s["all"] for n, s in scored.items() if s["own"] is not None},
        "target_classes": {n: s["classes"] for n, s in scored.items()},
    }


def target_metrics(scored: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics: ``test_acc/<target>`` (as in ``targets``), and for a target holding
    only some classes also ``test_acc/<target>/all_classes``; ``target_classes/<target>``."""
    out: dict[str, float] = {}
    for name, s in scored.items():
        out[f"test_acc/{name}"] = s["all"] if s["own"] is None else s["own"]
        if s["own"] is not None:
            out[f"test_acc/{name}/all_classes"] = s["all"]
        out[f"target_classes/{name}"] = s["classes"]
    return out


def verified_loss(candidate: dict[str, Any], epochs: int) -> float | None:
    """The verified run's training loss after as many epochs as the retraining trains (its
    last, when the retraining trains longer); None for an unverified candidate."""
    losses = candidate.get("train_losses")
    return losses[min(epochs, len(losses)) - 1] if losses else None


def retrain_tasks(spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[RetrainTask]:
    """Per dataset and seed: the search's top_k subnets, then every baseline."""
    tasks = []
    for ds, seed in pairs:
        found = {"top": []}
        if spec.search.enabled:
            found = searched_top(spec, ds.key, seed)
        for rank, cand in enumerate(found["top"][: spec.retrain.top_k], 1):
            tasks.append(
                RetrainTask(
                    **base,
                    dataset=ds.key,
                    seed=seed,
                    label=f"rank{rank}",
                    role="searched" if rank == 1 else "searched (not reported)",
                    subnet=cand["subnet"],
                    val_acc=cand["score"],
                    candidate_run_id=cand.get("mlflow_run_id"),
                    search_run_id=found.get("mlflow_run_id"),
                    verify_run_id=cand.get("verify_run_id"),
                    verified_loss=verified_loss(cand, spec.retrain.epochs),
                )
            )
        for name, subnet in spec.retrain.baselines.items():
            tasks.append(
                RetrainTask(
                    **base,
                    dataset=ds.key,
                    seed=seed,
                    label=f"baseline-{name}",
                    role="baseline",
                    subnet=subnet.to_data(),
                    full_finetune=name in spec.retrain.full_finetune,
                )
            )
    return tasks


class Retrain(Stage):
    name = "retrain"

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[RetrainTask]:
        return retrain_tasks(spec, base, pairs)

    @staticmethod
    def folder(layout: RunLayout, task: RetrainTask) -> Path:
        return layout.retrain(task.dataset, task.seed, task.label)

    run = staticmethod(run_retrain)
