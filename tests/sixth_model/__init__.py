"""A sixth model that lives only in the test tree (issue 17: one model, one folder): its spec,
input, a tiny network scripted to TorchScript, and its routing rule. tests/unit/test_sixth_model.py
shows it routed, inferred, reported and alerted with no change outside this folder."""
