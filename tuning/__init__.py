"""Everything that knows about Ray and MLflow: search spaces, the Tune driver, tracking, submission, the CLI."""
