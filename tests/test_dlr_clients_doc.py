"""docs/dlr-clients.md names settings, commands and request fields: they must exist, and the
client-side torch setting must do what the page says."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import pytest
import torch

from flplatform.broker.config import BrokerConfig
from flplatform.cli import build_parser
from flplatform.inference.config import InferenceSettings
from flplatform.inference.schemas import InferenceFields
from flplatform.settings import Settings

DOC = (Path(__file__).resolve().parents[1] / "docs" / "dlr-clients.md").read_text()


def _environment_names() -> set[str]:
    names = set()
    for settings in (Settings, InferenceSettings, BrokerConfig):
        prefix = settings.model_config.get("env_prefix", "")
        names |= {f"{prefix}{field}".upper() for field in settings.model_fields}
    return names


def test_every_flp_variable_in_the_page_is_a_setting():
    mentioned = set(re.findall(r"\bFLP_[A-Z0-9_]*[A-Z0-9]\b", DOC))
    assert "FLP_ALLOW_SELF_REGISTRATION" in mentioned
    assert mentioned <= _environment_names(), sorted(mentioned - _environment_names())


def test_self_registration_is_off_unless_the_variable_turns_it_on(monkeypatch):
    monkeypatch.delenv("FLP_ALLOW_SELF_REGISTRATION", raising=False)
    assert Settings(_env_file=None).allow_self_registration is False
    monkeypatch.setenv("FLP_ALLOW_SELF_REGISTRATION", "true")
    assert Settings(_env_file=None).allow_self_registration is True


def test_the_documented_commands_parse():
    parser = build_parser()
    createuser = parser.parse_args([
        "createuser", "--username", "mnist-client-01", "--password", "mnist-secret",
        "--email", "mnist.client-01@example.com", "--client", "--actor", "--message-endpoint", "http://client-01:8101/",
    ])  # fmt: skip
    assert createuser.actor and createuser.client and createuser.message_endpoint == "http://client-01:8101/"
    serve = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "8000"])
    assert serve.host == "0.0.0.0" and serve.port == 8000
    assert "flplatform createuser --username mnist-client-01 --password mnist-secret" in DOC


def test_return_scores_is_the_documented_request_field():
    assert "return_scores" in InferenceFields.model_fields
    assert InferenceFields.model_fields["return_scores"].default is False
    assert "`return_scores: true`" in DOC or "**`return_scores: true`**" in DOC


def _torchscript_archive() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    return buffer.getvalue()


def test_torch_refuses_torchscript_in_torch_load_unless_the_client_sets_the_variable(monkeypatch):
    """What the DLR client's ``Communication.unpack_model`` does: ``torch.load(BytesIO(blob))``."""
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" in DOC
    blob = _torchscript_archive()
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    with warnings.catch_warnings():  # the client silences torch's "looks like a TorchScript archive" too
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="weights_only"):
            torch.load(io.BytesIO(blob))
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        module = torch.load(io.BytesIO(blob))
    assert isinstance(module, torch.jit.ScriptModule)
