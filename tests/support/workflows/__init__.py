"""Workflows (templates + handlers) the worker tests run end to end."""
