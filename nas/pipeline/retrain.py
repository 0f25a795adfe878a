"""The retrain stage: the searched subnets (top_k) and the baselines retrained from the
pretrained backbone on the retraining split, tested once at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nas.cost import added_flops
from nas.data.decode import DecodedSplit, decode_split
from nas.families import build_prompted
from nas.jsonio import read_json, write_json
from nas.mlflow_model import inputs_record, log_retrained
from nas.pipeline.console import say
from nas.pipeline.context import (
    base_tags,
    data_params,
    dataset_group,
    device_for,
    epoch_hook,
    finish,
    load_splits,
    log_datasets,
    split_params,
    system_metrics,
    target_splits,
    task_context,
    tracker_for,
)
from nas.pipeline.hparams import (
    retrain_method,
    tuned,
)
from nas.pipeline.layout import load_state, run_layout, searched_top
from nas.pipeline.progress import Report
from nas.pipeline.stage import Pairs, Stage
from nas.pipeline.tasks import RetrainTask
from nas.spec import ExperimentSpec
from nas.subnet import Subnet
from nas.tracking import Tracker, subnet_params_flat
from trainers.train import (
    TrainConfig,
    evaluate,
    evaluate_target,
    train,
)

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
    spec, ds, seed = task_context(task)
    label, subnet = task.label, Subnet.from_data(task.subnet)
    out = run_layout(spec).retrain(ds.key, seed, label)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    fit = ds.retrain_split
    data = load_splits(spec, ds, (fit, "test"))
    num_classes = data[fit].num_classes
    targets = load_targets(spec, ds, data[fit])  # decoded before training: a bad one stops it
    rates = tuned(spec, ds.key, retrain_method(spec, label, task.role, seed))
    tracker = tracker_for(spec)
    g = spec.space.geometry
    group = dataset_group(spec, ds)
    tags = {**base_tags(spec, "retrain", ds, seed), "label": label, "group": group or ""}
    attempts = read_json(out / "attempts.json") if (out / "attempts.json").is_file() else []
    while True:
        cfg = spec.retrain.train_config(
            lr=rates.lr * RETRY_LR_FACTOR ** len(attempts),
            weight_decay=rates.weight_decay,
            seed=seed,
            module_lr=rates.module_lr,
        )
        attempt_tags = {**tags, "attempt": len(attempts)} if attempts else tags
        model, run_id, problem = _attempt(
            task, spec, data, targets, cfg, tracker, attempt_tags, report
        )
        if problem is None or len(attempts) >= MAX_RETRIES:
            break
        attempts.append({"lr": cfg.lr, "problem": problem, "mlflow_run_id": run_id})
        write_json(out / "attempts.json", attempts)
        tracker.client.set_tag(run_id, "nas.diverged", problem)
        tracker.finish(run_id, ok=False)
        (out / "state.pt").unlink(missing_ok=True)
        say(
            f"retrain {ds.key} seed {seed} {label}: diverged at lr {cfg.lr:g} ({problem}); "
            f"retrying at lr {cfg.lr * RETRY_LR_FACTOR:g}"
        )
    mean, std = spec.backbone.normalisation()
    test_acc = evaluate(model, data["test"], mean=mean, std=std)  # once, at the end
    scored = {n: evaluate_target(model, t, mean=mean, std=std) for n, t in targets.items()}
    model.save(out / "model")
    result = {
        "dataset": ds.key,
        "seed": seed,
        "label": label,
        "group": group,
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
        "head_params": spec.backbone.head_params(num_classes),
        "added_flops": added_flops(subnet, g),
        "mlflow_run_id": run_id,
        "node": task.node,
        **({"retries": attempts} if attempts else {}),
        **({"diverged": problem} if problem else {}),
        **target_results(scored),
    }
    if problem:  # still diverged after the retries: tested and reported, never silently
        tracker.client.set_tag(run_id, "nas.diverged", problem)
        say(f"retrain {ds.key} seed {seed} {label}: still diverged after {MAX_RETRIES} retries")
    final = {"test_acc": test_acc, "params": result["params"], "added_flops": result["added_flops"]}
    final |= target_metrics(scored)
    if task.val_acc is not None:
        final["val_acc"] = task.val_acc
    tracker.log_metrics(run_id, final)
    tracker.log_artifact(run_id, out / "model", "model")
    # the same model as a LoggedModel (MLflow 3's Models view; mlflow.pyfunc.load_model)
    inputs = inputs_record(g.image_size, g.in_chans, mean, std, data[fit].class_names)
    result["mlflow_model_id"] = logged_model(tracker, spec, run_id, out / "model", inputs, tags)
    return finish(tracker, run_id, out, result)


def _attempt(
    task: RetrainTask,
    spec: ExperimentSpec,
    data: dict[str, DecodedSplit],
    targets: dict[str, DecodedSplit],
    cfg: TrainConfig,
    tracker: Tracker,
    tags: dict[str, Any],
    report: Report,
):
    """One attempt at the retraining: the model built afresh (or resumed from state.pt), its
    MLflow run, its training; returns (model, run ID, why it diverged or None)."""
    spec_ds = next(d for d in spec.datasets if d.key == task.dataset)
    label, subnet, seed = task.label, Subnet.from_data(task.subnet), task.seed
    out = run_layout(spec).retrain(task.dataset, seed, label)
    fit = spec_ds.retrain_split
    torch.manual_seed(seed)
    model = build_prompted(
        spec.backbone,
        spec.space,
        data[fit],
        subnet=subnet,
        full_finetune=task.full_finetune,
        dataset=task.dataset,
    ).to(device_for(spec))
    state = load_state(out / "state.pt")
    run_id = tracker.run(
        f"retrain {task.dataset} seed {seed} {label}"
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
        description=f"{label} ({task.role}): {subnet_text(task, subnet) or 'the head alone'} "
        f"retrained on {fit}, tested once on test",
    )
    log_datasets(tracker, run_id, task.dataset, data[fit], data["test"], *targets.values())
    links = (
        ("candidate", task.candidate_run_id),
        ("search", task.search_run_id),
        ("verify", task.verify_run_id),
    )
    for key, value in links:
        if value:  # the runs this model came from, a click away in the UI
            tracker.client.set_tag(run_id, f"nas.{key}_run_id", value)
    mean, std = spec.backbone.normalisation()
    hook = epoch_hook(
        task,
        "retrain",
        out,
        tracker=tracker,
        run_id=run_id,
        state=state,
        epochs=cfg.epochs,
        report=report,
        label=label,
    )
    losses: list[float] = []

    def on_epoch(epoch: int, metrics: dict[str, float], get_state) -> None:
        losses.append(metrics["train_loss"])
        hook(epoch, metrics, get_state)

    if not model.trainable_parameters():  # an empty subnet on CLIP is zero-shot
        return model, run_id, None
    try:
        with system_metrics(spec, run_id):
            final = train(model, data[fit], cfg, mean=mean, std=std, state=state, on_epoch=on_epoch)
    except FloatingPointError as exc:  # a NaN or infinite loss
        return model, run_id, str(exc)
    if not final:  # resumed after its last epoch: it finished before the stop
        return model, run_id, None
    first = losses[0] if state is None and losses else None
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

    def done_marker(self, spec: ExperimentSpec, task: RetrainTask) -> Path:
        return run_layout(spec).retrain(task.dataset, task.seed, task.label) / "done.json"

    run = staticmethod(run_retrain)
