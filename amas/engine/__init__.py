"""Training and evaluation: the Trainer loop, learning-rate schedules and stop requests."""
