"""TiC evaluation parts: metrics, eval-split reading, the year matrix, plots, run jobs (API: trainer.evaluate)."""
