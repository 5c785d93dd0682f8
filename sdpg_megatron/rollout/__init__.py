"""Rollout: the Ray-managed vLLM fleet and the weight push from the trainer."""
