"""The ``aobd`` command line (DESIGN.md section 8)."""
