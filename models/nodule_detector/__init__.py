"""The lung nodule detector (chest CT): its spec, network, phantoms and training recipe."""
