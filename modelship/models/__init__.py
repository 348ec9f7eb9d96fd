"""Model zoo, shipped datasets, training and checkpoint loading."""
