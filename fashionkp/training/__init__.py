"""Stage 5, training: losses, schedules, callbacks, the LightningModule and ``train(cfg)``."""
