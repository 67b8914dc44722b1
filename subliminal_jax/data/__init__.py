"""Datasets used by the experiments (MNIST for the auxiliary-logit study)."""
