"""Weights in and out: start-from sources, open_clip .pt / local-dir import and export, fp32 consolidation."""
