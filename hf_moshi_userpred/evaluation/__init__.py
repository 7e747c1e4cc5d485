"""Evaluation: user-prediction metrics and calibration, turn taking (events, metrics, report, plots), dialogue
behaviour."""
