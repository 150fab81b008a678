"""A CT series as the DICOM listener hands it to the worker: each instance in the
worker's blob store and published on the instances topic, then the association's
transfer-complete marker (the integration tests that skip the listener start here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from radtriage.blobstore import LocalBlobStore
from radtriage.settings import Settings
from schemas.instances import InstanceEvent


@dataclass(frozen=True)
class Recon:
    """A head CT reconstruction as its instance events name it (the ICH rule prefers 5 mm
    soft tissue over thin, and reads no bone kernel)."""

    number: int
    description: str
    kernel: str


THIN = Recon(3, "Head 0.5x H30s", "H30s")
THICK = Recon(2, "Head 5.0 H30s", "H30s")
BONE = Recon(4, "Head 5.0 H70h", "H70h")


def send_series(
    producer: KafkaProducer,
    settings: Settings,
    files: list[Path],
    study: str,
    recon: Recon,
    thickness: float,
    **event_fields: Any,
) -> None:
    """Series `recon.number` of `study` (its UID `{study}.{number}`, instance i's
    `{series}.{i}`); `event_fields` (e.g. the order's accession and patient id) go on every
    instance event."""
    number = recon.number
    series = f"{study}.{number}"
    blobs = LocalBlobStore(settings.blob_dir)
    for i, path in enumerate(files):
        sop = f"{series}.{i + 1}"
        event = InstanceEvent(
            study_uid=study,
            series_uid=series,
            sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            body_part="HEAD",
            series_description=recon.description,
            blob_uri=blobs.put_instance(study, series, sop, path.read_bytes()),
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            convolution_kernel=recon.kernel,
            slice_thickness_mm=thickness,
            series_number=number,
            rows=128,
            columns=128,
            bits_allocated=16,
            **event_fields,
        )
        producer.send(settings.topics.instances, key=study.encode(), value=event.to_bytes())
    marker = InstanceEvent(kind="transfer_complete", study_uid=study, instance_count=len(files))
    producer.send(settings.topics.instances, key=study.encode(), value=marker.to_bytes()).get(10)
