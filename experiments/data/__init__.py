"""Dataset fetchers and builders (cached, atomic) and batch readers."""
