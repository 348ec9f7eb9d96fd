"""Load tests that check every served answer against golden outputs from the PyTorch reference."""
