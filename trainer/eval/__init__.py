"""TiC evaluation, imported one way: metrics -> matrix -> plots -> report -> data/evaluator -> checkpoints -> runs."""
