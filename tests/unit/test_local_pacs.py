"""`radtriage up --pacs`: the local Orthanc's configuration and the destination it adds."""

from __future__ import annotations

from pathlib import Path

from radtriage.settings import RESULT_OBJECTS, DispatchSettings
from radtriage.stack.orthanc import AE_TITLE, DICOMWEB_PLUGIN, destination, orthanc_config


def test_local_only_no_auth_its_own_ports_and_storage() -> None:
    config = orthanc_config(Path("/data/pacs"), 4242, 8042, dicomweb=True)
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is False
    assert (config["DicomPort"], config["HttpPort"], config["DicomAet"]) == (4242, 8042, AE_TITLE)
    assert config["StorageDirectory"] == "/data/pacs"
    assert config["Plugins"] == [str(DICOMWEB_PLUGIN)] and config["DicomWeb"]["Enable"] is True
    plain = orthanc_config(Path("/data/pacs"), 4242, 8042, dicomweb=False)
    assert plain["Plugins"] == [] and plain["DicomWeb"]["Enable"] is False


def test_the_destination_takes_every_object_of_every_finding() -> None:
    target = destination(4242)
    assert set(target.objects) == set(RESULT_OBJECTS)
    assert target.where == f"{AE_TITLE}@127.0.0.1:4242"
    assert target.wants("ICH", positive=False) and target.wants("LVO", positive=True)
    # As `up --pacs` hands it to the worker: through the settings, JSON and back.
    again = DispatchSettings.model_validate_json(DispatchSettings(destinations=[target]).model_dump_json())
    assert again.destinations == [target]
