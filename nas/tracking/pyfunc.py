"""The pyfunc model file that ``nas.tracking.logged_model.log_retrained`` logs (MLflow's models from
code: the model is this file, not a pickle)."""

import mlflow

from nas.tracking.logged_model import PromptedClassifier

mlflow.models.set_model(PromptedClassifier())
