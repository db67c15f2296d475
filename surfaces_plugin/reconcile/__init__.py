"""Reconciliation: inventory (read Matrix) → plan (pure) → apply (write Matrix, rebuild cache).

The algorithm and its cases are in docs/reconciliation.md.
"""
