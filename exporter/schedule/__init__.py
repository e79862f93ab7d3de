"""When probes run: the scheduler's jobs and the duty budget that may skip a round."""
