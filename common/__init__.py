"""What both sides of a MyeloFed study share: configuration, errors, provenance, the CLI."""
