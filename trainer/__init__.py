"""tic-trainer: continual CLIP training of open_clip models with DeepSpeed."""
