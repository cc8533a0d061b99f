"""Test support: the scripted model runner (fake_runner.py) and the Pilot helpers that run the
real Engine on it (pilot.py)."""
