"""The mammography BI-RADS suggestion model: its spec, network, phantoms and training recipe."""
