"""The intracranial haemorrhage classifier (non-contrast head CT): its spec, network,
phantoms and training recipe."""
