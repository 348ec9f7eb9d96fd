"""Serving: the REST codec, the TorchServe handler, .mar archiving and server start/stop.

Everything TorchServe-specific lives in this package.
"""
