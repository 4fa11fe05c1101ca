"""Training objectives: MoCa masking (MLM + MAE), reconstruction losses, contrastive loss."""
