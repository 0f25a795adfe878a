"""The retrain stage: the searched subnets (top_k) and the baselines retrained from the
pretrained backbone on the retraining split, tested once at the end."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from nas import factory
from nas.cost import added_flops
from nas.jsonio import read_json
from nas.pipeline.context import (
    base_tags,
    data_params,
    dataset_group,
    device_for,
    eta_s,
    finish,
    load_splits,
    split_params,
    task_context,
    tracker_for,
)
from nas.pipeline.hparams import (
    retrain_method,
    tuned,
)
from nas.pipeline.layout import load_state, retrain_dir, search_dir
from nas.pipeline.progress import EpochProgress, Report
from nas.spec import ExperimentSpec
from nas.subnet import Subnet
from nas.tracking import subnet_params_flat
from trainers.train import (
    evaluate,
    train,
)


def run_retrain(task: dict[str, Any], report: Report = lambda m: None) -> dict[str, Any]:
    """Retrain one subnet from the pretrained backbone on the dataset's retraining split
    (``DatasetSpec.retrain_split``: train+val, or a few-shot protocol's K shots alone); test
    once at the end."""
    spec, ds, seed = task_context(task)
    label, subnet = task["label"], Subnet.from_data(task["subnet"])
    out = retrain_dir(spec, ds.key, seed, label)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    device = device_for(spec)
    fit = ds.retrain_split
    data = load_splits(spec, ds, (fit, "test"))
    num_classes = data[fit].num_classes
    torch.manual_seed(seed)
    model = factory.subnet_model(
        spec.space,
        spec.backbone,
        subnet,
        data[fit],
        full_finetune=bool(task.get("full_finetune")),
        dataset=ds.key,
    ).to(device)
    r = spec.retrain
    rates = tuned(spec, ds.key, retrain_method(spec, label, task["role"], seed))
    cfg = r.train_config(
        lr=rates.lr, weight_decay=rates.weight_decay, seed=seed, module_lr=rates.module_lr
    )
    state_path = out / "state.pt"
    state = load_state(state_path)
    tracker = tracker_for(spec)
    g = spec.space.geometry
    group = dataset_group(spec, ds)
    tags = {**base_tags(spec, "retrain", ds, seed), "label": label, "group": group or ""}
    run_id = tracker.run(
        f"retrain {ds.key} seed {seed} {label}",
        tags,
        params={
            **cfg.to_dict(),
            **subnet_params_flat(subnet.to_data()),
            "subnet": "full fine-tuning" if task.get("full_finetune") else str(subnet),
            "role": task["role"],
            **split_params(data[fit], data["test"]),
            **data_params(data[fit], data["test"]),
        },
    )
    mean, std = spec.backbone.normalisation()
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], get_state) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".state.{os.getpid()}.tmp"
        torch.save(get_state(), tmp)
        os.replace(tmp, state_path)
        report(
            EpochProgress(
                "retrain",
                ds.key,
                seed,
                label=label,
                eta_s=eta_s(started, epoch - (state["epoch"] if state else 0), cfg.epochs - epoch),
                epoch=epoch,
                epochs=cfg.epochs,
                metrics=metrics,
            )
        )

    if model.trainable_parameters():  # an empty subnet on CLIP is zero-shot: nothing trains
        train(model, data[fit], cfg, mean=mean, std=std, state=state, on_epoch=on_epoch)
    test_acc = evaluate(model, data["test"], mean=mean, std=std)  # once, at the end
    model.save(out / "model")
    result = {
        "dataset": ds.key,
        "seed": seed,
        "label": label,
        "group": group,
        "role": task["role"],
        "subnet": subnet.to_data(),
        "subnet_str": "full fine-tuning" if task.get("full_finetune") else str(subnet),
        "val_acc": task.get("val_acc"),
        "test_acc": test_acc,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "train_split": fit,
        "train_images": len(data[fit]),
        "params": model.num_params()["modules"],
        "head_params": factory.head_params(spec.backbone, num_classes),
        "added_flops": added_flops(subnet, g),
        "mlflow_run_id": run_id,
        "node": task.get("node"),
    }
    final = {"test_acc": test_acc, "params": result["params"], "added_flops": result["added_flops"]}
    if task.get("val_acc") is not None:
        final["val_acc"] = task["val_acc"]
    tracker.log_metrics(run_id, final)
    tracker.log_artifact(run_id, out / "model", "model")
    return finish(tracker, run_id, out, result)


def retrain_tasks(spec: ExperimentSpec, base: dict[str, Any], pairs) -> list[dict[str, Any]]:
    tasks = []
    for ds, seed in pairs:
        found = {"top": []}
        if spec.search.enabled:
            found = read_json(search_dir(spec, ds.key, seed) / "done.json")
        for rank, cand in enumerate(found["top"][: spec.retrain.top_k], 1):
            tasks.append(
                {
                    **base,
                    "dataset": ds.key,
                    "seed": seed,
                    "label": f"rank{rank}",
                    "role": "searched" if rank == 1 else "searched (not reported)",
                    "subnet": cand["subnet"],
                    "val_acc": cand["score"],
                }
            )
        for name, subnet in spec.retrain.baselines.items():
            tasks.append(
                {
                    **base,
                    "dataset": ds.key,
                    "seed": seed,
                    "label": f"baseline-{name}",
                    "role": "baseline",
                    "subnet": subnet.to_data(),
                    "full_finetune": name in spec.retrain.full_finetune,
                    "val_acc": None,
                }
            )
    return tasks
