"""The training harness: the LightningModule, losses, checkpoints, resume, callbacks and the DDP launch."""
