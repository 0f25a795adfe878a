"""The MLflow UI's saved views of one output folder (its retrained models side by side; its
stage runs without the candidates) and the links that open them."""

from __future__ import annotations

import json

from mlflow import MlflowClient

#: The columns of the winners' view in the MLflow UI (canonical keys, as its runs table names
#: them), in order.
WINNER_COLUMNS = (
    "metrics.`test_acc`",
    "metrics.`val_acc`",
    "metrics.`params`",
    "metrics.`added_flops`",
    "params.`subnet`",
    "params.`role`",
    "tags.`nas.dataset`",
    "tags.`nas.seed`",
)


def winners_view(client: MlflowClient, experiment_id: str, output_id: str) -> str:
    """An MLflow UI view of one output folder's retrained models, saved on the experiment as
    the UI saves a shared view (tag ``mlflow.sharedViewState.<key>``): its retrain runs only
    (no candidate or stage run in the way), the searched winners first (then the baselines),
    test_acc, val_acc, params and added FLOPs as columns. Returns the key; the page is
    ``#/experiments/<id>/runs?viewStateShareKey=<key>``. (The UI shares no pinned runs.)"""
    where = f"tags.`nas.stage` = 'retrain' and tags.`nas.output_id` = '{output_id}'"
    key = f"nas-winners-{output_id[:12]}"
    # "searched" sorts before "searched (not reported)", then the baselines
    return _save_view(client, experiment_id, key, where, "params.`role`")


def stages_view(client: MlflowClient, experiment_id: str, output_id: str) -> str:
    """A saved view of one output folder's runs without its candidates, newest first: every
    stage run (hparams, supernet, search, verify, retrain) on the first page. The default
    runs page pages child runs with the rest (100 to a page, newest first), so a search's
    candidates push the supernet runs behind "Load more"."""
    where = f"tags.`nas.output_id` = '{output_id}' and tags.`nas.candidate` IS NULL"
    return _save_view(client, experiment_id, f"nas-stages-{output_id[:12]}", where,
                      "attributes.start_time")  # fmt: skip


def _save_view(client: MlflowClient, experiment_id: str, key: str, where: str, order: str) -> str:
    state = {
        "searchFilter": where,
        "orderByKey": order,
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(WINNER_COLUMNS),
        "runsExpanded": {},
        "viewMaximized": False,
        "runListHidden": False,
    }
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(state))
    return key


def ui_link(uri: str, experiment_id: str, key: str) -> str:
    """Where the MLflow UI shows the view ``key``: on the tracking server itself, or, for a
    local store, once ``mlflow ui`` serves it."""
    page = f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return (
        f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then "
        f"http://127.0.0.1:5000/{page}"
    )
