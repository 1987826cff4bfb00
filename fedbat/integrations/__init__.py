"""Integrations that carry fedbat beyond one job: ``flower`` (a real Flower deployment)."""
