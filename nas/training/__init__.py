"""Training and evaluation loops (they know nothing about Ray or MLflow) and what a
supernet step samples."""
