"""The supernet stage: the weight-entangled supernet trained on the training split, a
subnet (or the sandwich of them) per step, resumable from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from nas.pipeline.context import (
    base_tags,
    data_params,
    load_splits,
    supernet_steps,
)
from nas.pipeline.layout import RunLayout
from nas.pipeline.progress import Report
from nas.pipeline.rates import tuned
from nas.pipeline.stage import Pairs, Stage
from nas.pipeline.tasks import Task
from nas.pipeline.trial import Trial
from nas.spec.experiment import ExperimentSpec


def run_supernet(task: Task, report: Report = lambda p: None) -> dict[str, Any]:
    """Train the supernet on the dataset's training split (resuming from its state.pt)."""
    trial = Trial.of(task, "supernet", Supernet.folder)
    if (done := trial.finished()) is not None:
        return done
    spec, ds, seed = trial.spec, trial.ds, trial.seed
    data = load_splits(spec, ds, ("train",))["train"]
    model = trial.model(data)
    st = spec.supernet
    rates = tuned(spec, ds.key, "supernet")
    cfg = st.train_config(
        lr=rates.lr, weight_decay=rates.weight_decay, seed=seed, module_lr=rates.module_lr
    )
    run_id = trial.track(
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
        splits=(data,),
    )
    trial.fit(
        model,
        data,
        cfg,
        run_id,
        report,
        sample_subnet=supernet_steps(spec),
        checkpoint_every=st.checkpoint_every,
    )
    save_file(
        {k: v.contiguous() for k, v in model.trainable_state_dict().items()},
        str(trial.folder / "supernet.safetensors"),
    )
    result = {
        "dataset": ds.key,
        "seed": seed,
        "num_classes": data.num_classes,
        "mlflow_run_id": run_id,
        "node": task.node,
    }
    return trial.finish(run_id, result)


def dataset_tasks(base: dict[str, str], pairs: Pairs) -> list[Task]:
    """One task per dataset and seed."""
    return [Task(**base, dataset=ds.key, seed=seed) for ds, seed in pairs]


class Supernet(Stage):
    """The supernet alone (the pipeline runs it with the search: ``SupernetAndSearch``)."""

    name = "supernet"

    def tasks(self, spec: ExperimentSpec, base: dict[str, str], pairs: Pairs) -> list[Task]:
        return dataset_tasks(base, pairs)

    @staticmethod
    def folder(layout: RunLayout, task: Task) -> Path:
        return layout.supernet(task.dataset, task.seed)

    run = staticmethod(run_supernet)
