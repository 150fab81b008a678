"""The chest radiograph triage model (pneumothorax): its spec, network, phantoms and training recipe."""
