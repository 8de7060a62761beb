"""Fine-tuning: instruction-tuning (SFT) data, masks, packing and batches."""
