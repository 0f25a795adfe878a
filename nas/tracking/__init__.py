"""MLflow: runs found by their tags, retrained models as pyfunc LoggedModels, the UI's
saved views, and the search's plots."""
