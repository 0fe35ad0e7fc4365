"""Analyses: pure functions over models and data; probes wrap them for the CLI and result store."""
