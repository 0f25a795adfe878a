"""Kept for MLflow models logged before the package was layered (2026-12-07): their model file
(MLflow's models from code, a copy of ``nas/tracking/pyfunc.py`` as it was) imports
``nas.mlflow_model.PromptedClassifier``. New models import ``nas.tracking.logged_model``."""

from nas.tracking.logged_model import PromptedClassifier

__all__ = ["PromptedClassifier"]
