"""The optimizer, its learning-rate schedules and the stability guard that judges each of its steps."""
