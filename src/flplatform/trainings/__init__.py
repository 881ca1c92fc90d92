"""Trainings: creation, the round phase machine, notifications to participants, aggregation of a round."""
