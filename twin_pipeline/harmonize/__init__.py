"""Harmonization: raw records mapped into the identified twin tables (no Dagster import)."""
