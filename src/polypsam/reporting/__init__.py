"""Reporting: results tables, the comparison of evaluations, provenance, drawing and the study report."""
