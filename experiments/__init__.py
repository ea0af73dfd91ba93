"""Experiments for stquant-jax: data, models, optimizers and a training loop."""
