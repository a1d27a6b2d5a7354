"""Shared fixtures. S3 fixtures (a real SeaweedFS server) live in s3fixtures.py."""

pytest_plugins = ["s3fixtures"]
