"""The search pipeline: supernet training, subnet search and retraining, per dataset and seed,
scheduled by Ray Tune and tracked in MLflow. One module per stage (``hparams``, ``supernet``,
``search``, ``retrain``) holds the Ray-free work of a trial; ``context`` what a trial shares,
``layout`` the run folder; ``ray_layer`` the thin adapter to Ray Tune; ``preflight`` the
checks before anything starts, ``provenance`` what a run records, ``reports`` its results
table; ``driver`` the orchestration and resume."""
