"""What the recipes' loops call: the accelerator and precision, the start of a run and its resume, evaluation,
checkpoints, the loss meter and trackers, and saving."""
