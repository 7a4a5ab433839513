"""Test helpers shared by tests/server and tests/sdk (imported as ``support``)."""
