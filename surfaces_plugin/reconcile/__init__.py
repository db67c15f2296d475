"""Reconciliation: inventory (read Matrix) → plan (pure) → apply (write Matrix, rebuild cache)."""
