"""Speed and memory measurements; each prints JSON lines. Not tests."""
