"""How radtriage's own DICOM result objects are told apart from what a PACS sends it.

Every object radtriage sends to a PACS (processors/dicom_results.py) carries this
Manufacturer and Manufacturer's Model Name in its General Equipment module. A PACS that
forwards a study to radtriage, results included (an auto-routing rule on the study, a
"send study" click), would otherwise have radtriage assemble, route and export its own
results again: the listener recognises them and stores nothing (connectors/dicom/scp.py).

Both values, not the Manufacturer alone: radtriage's phantom images also say
"radtriage" (models/dicom_writer.py) and must be read. Light on purpose (no highdicom):
the listener imports it.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

MANUFACTURER = "radtriage"
# The General Equipment "model" of the results: what the listener recognises.
RESULTS_MODEL_NAME = "radtriage AI results"


def is_radtriage_result(ds: Dataset) -> bool:
    """True for an object radtriage itself made and sent to a PACS."""
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    model = str(ds.get("ManufacturerModelName", "") or "").strip()
    return manufacturer == MANUFACTURER and model == RESULTS_MODEL_NAME
