"""ml_collections configs: `get_config(arg=None)` per file, variants by arg."""
