"""The search pipeline: supernet training, subnet search and retraining, per dataset and seed,
scheduled by Ray Tune and tracked in MLflow. ``stages`` holds the Ray-free work of one trial,
``ray_layer`` the thin adapter to Ray Tune, ``driver`` the orchestration and resume."""
