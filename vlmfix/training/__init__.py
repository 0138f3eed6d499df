"""Training: DCD's positive / negative projectors (`vlmfix.training.dcd`) and the AIA fine-tuning loss."""
