"""Fleet simulator: many real device daemons against a real broker, staged
rollouts, injected faults, and a report of what happened."""
