"""Result tables as code: one command per table of `results/README.md`."""
