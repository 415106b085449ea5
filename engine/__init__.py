"""DeepMIM pretraining engine: config, models, targets, DeepSpeed training loop."""
