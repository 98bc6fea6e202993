"""Training launchers and the demo (run from the repository root: python -m launch.demo)."""
