"""Training: the accelerator and precision, the run, the loop, checkpoints and outputs."""
