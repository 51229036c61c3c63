"""Experiment entry points: absl flags, configs and the training loop."""
