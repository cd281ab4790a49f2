"""abproxy and MLflow, both ways: the periodic look that reads the counters from Redis and writes
each experiment's runs, winner and LoggedModels into MLflow (flusher, writer), sampled requests
as MLflow traces (traces), promotion of a winner (promote), and Prompt Registry URIs in the
config resolved at start (prompts)."""
