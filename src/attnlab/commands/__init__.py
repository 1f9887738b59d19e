"""Small CLI commands (info, generate) that belong to no single subsystem."""
