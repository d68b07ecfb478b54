"""Optimisation beyond torch.optim: the learning-rate schedule, Muon, and the end of a training step."""
