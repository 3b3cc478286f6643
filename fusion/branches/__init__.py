"""Model branches: one file per sensor, each Batch -> BEV [B, C, H, W] on the shared BEVGrid."""
