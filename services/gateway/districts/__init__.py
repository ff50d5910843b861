"""District platforms pushing their records in their own dialect (SPEC §5)."""
