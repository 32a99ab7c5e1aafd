"""Composition: the agent (loop + serving), the daemon adding fleet link and rollouts, the demo."""
