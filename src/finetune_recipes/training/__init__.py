"""What the recipes' loops call: the accelerator (mixed precision, launch checks, FSDP wrapping), the start of a run
(resume, output_dir claimed, trackers) and its batches, evaluation, checkpoints and best weights, the loss meter
and trackers, and saving."""
