"""Pure statistics over sufficient statistics: no I/O, no web, Redis or MLflow imports."""
