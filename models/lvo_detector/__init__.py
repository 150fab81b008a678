"""The large-vessel occlusion detector (head/neck CTA): its spec, network, phantoms and training recipe."""
