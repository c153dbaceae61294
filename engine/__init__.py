"""Shared layers every task builds on: the training runner, config schema, files, logging, distributed set-up, tool scaffold."""
