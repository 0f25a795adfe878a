"""The supernet stage: the weight-entangled supernet trained on the training split, a
subnet (or the sandwich of them) per step, resumable from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nas.families import build_prompted
from nas.jsonio import read_json
from nas.pipeline.context import (
    base_tags,
    data_params,
    device_for,
    epoch_hook,
    finish,
    load_splits,
    log_datasets,
    supernet_steps,
    system_metrics,
    task_context,
    tracker_for,
)
from nas.pipeline.hparams import (
    tuned,
)
from nas.pipeline.layout import load_state, run_layout
from nas.pipeline.progress import Report
from nas.pipeline.stage import Pairs, Stage
from nas.pipeline.tasks import Task
from nas.spec import ExperimentSpec
from trainers.train import train


def run_supernet(task: Task, report: Report = lambda p: None) -> dict[str, Any]:
    """Train the supernet on the dataset's training split (resuming from its state.pt)."""
    spec, ds, seed = task_context(task)
    out = run_layout(spec).supernet(ds.key, seed)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    device = device_for(spec)
    data = load_splits(spec, ds, ("train",))["train"]
    torch.manual_seed(seed)
    model = build_prompted(spec.backbone, spec.space, data, dataset=ds.key).to(device)
    st = spec.supernet
    rates = tuned(spec, ds.key, "supernet")
    cfg = st.train_config(
        lr=rates.lr, weight_decay=rates.weight_decay, seed=seed, module_lr=rates.module_lr
    )
    state = load_state(out / "state.pt")
    tracker = tracker_for(spec)
    run_id = tracker.run(
        f"supernet {ds.key} seed {seed}",
        base_tags(spec, "supernet", ds, seed),
        params={
            **cfg.to_dict(),
            "space": spec.space.name,
            "train_split": data.name,
            "train_images": len(data),
            **data_params(data),
        },
        description=f"Supernet of {spec.space.name} on {ds.key} (seed {seed}): "
        f"{cfg.epochs} epochs on {data.name}",
    )
    log_datasets(tracker, run_id, ds.key, data)
    mean, std = spec.backbone.normalisation()
    on_epoch = epoch_hook(
        task,
        "supernet",
        out,
        tracker=tracker,
        run_id=run_id,
        state=state,
        epochs=cfg.epochs,
        report=report,
        checkpoint_every=st.checkpoint_every,
    )
    with system_metrics(spec, run_id):
        train(
            model,
            data,
            cfg,
            mean=mean,
            std=std,
            sample_subnet=supernet_steps(spec),
            state=state,
            on_epoch=on_epoch,
        )
    save_file(
        {k: v.contiguous() for k, v in model.trainable_state_dict().items()},
        str(out / "supernet.safetensors"),
    )
    result = {
        "dataset": ds.key,
        "seed": seed,
        "num_classes": data.num_classes,
        "mlflow_run_id": run_id,
        "node": task.node,
    }
    return finish(tracker, run_id, out, result)


def dataset_tasks(base: dict[str, str], pairs: Pairs) -> list[Task]:
    """One task per dataset and seed."""
    return [Task(**base, dataset=ds.key, seed=seed) for ds, seed in pairs]


class Supernet(Stage):
    """The supernet alone (the pipeline runs it with the search: ``SupernetAndSearch``)."""

    name = "supernet"

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[Task]:
        return dataset_tasks(base, pairs)

    def done_marker(self, spec: ExperimentSpec, task: Task) -> Path:
        return run_layout(spec).supernet(task.dataset, task.seed) / "done.json"

    run = staticmethod(run_supernet)
