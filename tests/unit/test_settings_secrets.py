"""Every secret in the settings is masked in a dump and in clear for `up`'s children
(`Settings.inheritable_json`): a child that got the mask would authenticate with
"**********" (the EHR's FHIR bearer token and password once did)."""

from __future__ import annotations

import inspect
import typing
from typing import Annotated, Any

from pydantic import BaseModel, PlainSerializer, SecretStr

from radtriage import settings as settings_module
from radtriage.settings import EhrFhirAuthSettings, EhrFhirSettings, Settings


def _unrevealed_secrets(annotation: Any, wrapped: bool = False) -> bool:
    """Whether `annotation` holds a SecretStr not wrapped with a serializer."""
    if annotation is SecretStr:
        return not wrapped
    if typing.get_origin(annotation) is Annotated:
        inner, *meta = typing.get_args(annotation)
        return _unrevealed_secrets(inner, wrapped or any(isinstance(m, PlainSerializer) for m in meta))
    return any(_unrevealed_secrets(arg, wrapped) for arg in typing.get_args(annotation))


def test_every_secret_field_has_the_reveal_serializer() -> None:
    unrevealed = []
    for name, model in inspect.getmembers(settings_module, inspect.isclass):
        if not issubclass(model, BaseModel) or model.__module__ != settings_module.__name__:
            continue
        serialized = {
            f for d in model.__pydantic_decorators__.field_serializers.values() for f in d.info.fields
        }
        for field, info in model.model_fields.items():
            annotation = info.rebuild_annotation()
            if field not in serialized and _unrevealed_secrets(annotation):
                unrevealed.append(f"{name}.{field}")
    assert unrevealed == []


def test_the_ehr_fhir_credentials_reach_a_child_of_up() -> None:
    for auth in (
        EhrFhirAuthSettings(bearer_token=SecretStr("t0k")),
        EhrFhirAuthSettings(username="radtriage", password=SecretStr("pa55")),
    ):
        settings = Settings()
        settings.ehr.fhir = EhrFhirSettings(base_url="https://ehr.example/fhir", auth=auth)
        assert "t0k" not in settings.model_dump_json() and "pa55" not in settings.model_dump_json()
        child = Settings.model_validate_json(settings.inheritable_json()).ehr.fhir
        assert child is not None
        if auth.bearer_token is not None:
            assert child.auth.bearer_token is not None
            assert child.auth.bearer_token.get_secret_value() == "t0k"
        else:
            assert child.auth.password is not None and child.auth.password.get_secret_value() == "pa55"
