"""Experiment specs: datasets, backbone, space, seeds, resources and each stage's settings."""
