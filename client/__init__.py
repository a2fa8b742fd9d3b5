"""The hospital site: ingestion, standardization, feature extraction (and later local training)."""
