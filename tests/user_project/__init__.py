"""A user's own Lightning project, written without fedbat in mind (used by the tests)."""
