"""DeepGen config files (mmengine-style Python). Load them with `worker.deepgen.configuration.load_config`."""
