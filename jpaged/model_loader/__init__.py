"""Checkpoint loading: files on disk in, parameter pytrees out."""
