"""The semantic cache service: exact and verified semantic lookups of answers on Redis Stack."""
