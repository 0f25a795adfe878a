"""The supernet stage: the weight-entangled supernet trained on the training split, a
subnet (or the sandwich of them) per step, resumable from its checkpoint."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from safetensors.torch import save_file

from nas import factory
from nas.jsonio import read_json
from nas.pipeline.context import (
    base_tags,
    data_params,
    device_for,
    eta_s,
    finish,
    load_splits,
    supernet_steps,
    task_context,
    tracker_for,
)
from nas.pipeline.hparams import (
    tuned,
)
from nas.pipeline.layout import load_state, supernet_dir
from nas.pipeline.progress import EpochProgress, Report
from trainers.train import (
    train,
)


def run_supernet(task: dict[str, Any], report: Report = lambda m: None) -> dict[str, Any]:
    spec, ds, seed = task_context(task)
    out = supernet_dir(spec, ds.key, seed)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    device = device_for(spec)
    data = load_splits(spec, ds, ("train",))["train"]
    torch.manual_seed(seed)
    model = factory.supernet(spec.space, spec.backbone, data, ds.key).to(device)
    st = spec.supernet
    rates = tuned(spec, ds.key, "supernet")
    cfg = st.train_config(
        lr=rates.lr, weight_decay=rates.weight_decay, seed=seed, module_lr=rates.module_lr
    )
    state_path = out / "state.pt"
    state = load_state(state_path)
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
    )
    mean, std = spec.backbone.normalisation()
    started = time.time()

    def on_epoch(epoch: int, metrics: dict[str, float], get_state) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        if epoch % st.checkpoint_every == 0 or epoch == cfg.epochs:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".state.{os.getpid()}.tmp"
            torch.save(get_state(), tmp)
            os.replace(tmp, state_path)
        report(
            EpochProgress(
                "supernet",
                ds.key,
                seed,
                eta_s=eta_s(started, epoch - (state["epoch"] if state else 0), cfg.epochs - epoch),
                epoch=epoch,
                epochs=cfg.epochs,
                metrics=metrics,
            )
        )

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
        "node": task.get("node"),
    }
    return finish(tracker, run_id, out, result)
