"""Coordinator: sharding planner, versioned plans in Redis, membership, plan rollouts, recovery."""
