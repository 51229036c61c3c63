"""The run layer every experiment shares: driver, checkpoints, logs, devices."""
