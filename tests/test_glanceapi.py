"""The Glance API client against a stand-in Keystone and Glance on 127.0.0.1."""

import uuid

import pytest
from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.cmd.commands import COMMAND_OPT
from glance_image_sync.exceptions import ConfigError, Rejected
from glance_image_sync.glanceapi import GlanceApi, ImageState
from tests.glancestandin import StandIn
from tests.helpers import write_config

LIVE, DELETED, KILLED, QUEUED, UNKNOWN = (str(uuid.uuid4()) for _ in range(5))


def settings_with(tmp_path, sections, *first_files):
    """Settings from our file with extra ``sections`` ({group: {option: value}})."""
    path = write_config(tmp_path)
    path.write_text(path.read_text() + "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
        for group, values in sections.items()))
    argv = [arg for first in first_files for arg in ("--config-file", str(first))]
    return service.prepare(cfg.ConfigOpts(), [*argv, "--config-file", str(path), "both"],
                           COMMAND_OPT)


@pytest.fixture
def standin():
    with StandIn() as server:
        server.images.update({LIVE: "active", DELETED: "deleted", KILLED: "killed",
                              QUEUED: "queued"})
        yield server


def test_without_credentials_the_api_can_tell_nothing_and_that_is_no_error(tmp_path):
    settings = settings_with(tmp_path, {})
    api = GlanceApi(settings.glance_api)
    assert not api.configured
    answer = api.image_state(LIVE)
    assert answer.state is ImageState.CANNOT_TELL and not answer.gone
    assert "no Glance API credentials" in answer.detail
    # auth_type without auth_url is not configured either.
    settings = settings_with(tmp_path, {"keystone_authtoken": {"auth_type": "password"}})
    assert not GlanceApi(settings.glance_api).configured


def test_glance_answers_active_gone_or_unknown_through_the_catalog(tmp_path, standin):
    settings = settings_with(tmp_path, {"keystone_authtoken": standin.config()})
    api = GlanceApi(settings.glance_api)
    assert api.configured
    assert api.image_state(LIVE).state is ImageState.ACTIVE
    assert api.image_state(QUEUED).state is ImageState.ACTIVE  # an upload under way
    for gone in (DELETED, KILLED, UNKNOWN):
        assert api.image_state(gone).gone, gone
    assert api.image_state(UNKNOWN).detail == "Glance's API: no such image (404)"
    assert api.image_state(DELETED).detail == "Glance's API: status deleted"
    # One token for all of them, sent with every request to Glance.
    assert [r for r in standin.requests if r[0] == "POST"] == [("POST", "/v3/auth/tokens", None)]
    glance = [r for r in standin.requests if r[1].startswith("/glance/")]
    assert glance and all(token == standin.token for _, _, token in glance)
    assert glance[0][1] == f"/glance/v2/images/{LIVE}"


@pytest.mark.parametrize("status", [500, 503, 403])
def test_an_error_from_glance_is_never_evidence(tmp_path, standin, status):
    settings = settings_with(tmp_path, {"keystone_authtoken": standin.config()})
    standin.glance_status = status
    answer = GlanceApi(settings.glance_api).image_state(UNKNOWN)
    assert answer.state is ImageState.CANNOT_TELL
    assert answer.detail == f"Glance's API answered {status}"


def test_refused_credentials_or_no_service_is_never_evidence(tmp_path, standin):
    wrong = standin.config(password="wrong")  # noqa: S106 - the stand-in's test password
    refused = settings_with(tmp_path, {"keystone_authtoken": wrong})
    answer = GlanceApi(refused.glance_api).image_state(UNKNOWN)
    assert answer.state is ImageState.CANNOT_TELL and "cannot ask" in answer.detail
    other_region = settings_with(tmp_path, {"keystone_authtoken": standin.config(),
                                            "glance_api": {"region_name": "Elsewhere"}})
    answer = GlanceApi(other_region.glance_api).image_state(UNKNOWN)
    assert answer.state is ImageState.CANNOT_TELL and "cannot ask" in answer.detail
    standin.__exit__()
    down = settings_with(tmp_path, {"keystone_authtoken": standin.config()})
    assert GlanceApi(down.glance_api).image_state(UNKNOWN).state is ImageState.CANNOT_TELL


def test_endpoint_override_bypasses_the_catalog(tmp_path, standin):
    standin.region = "Elsewhere"  # the catalog would name no endpoint for RegionOne
    settings = settings_with(tmp_path, {
        "keystone_authtoken": standin.config(),
        "glance_api": {"region_name": "RegionOne", "endpoint_override": f"{standin.url}/glance"}})
    api = GlanceApi(settings.glance_api)
    assert api.image_state(UNKNOWN).gone
    assert api.image_state(LIVE).state is ImageState.ACTIVE


def test_glance_api_conf_as_another_config_file_gives_its_service_credentials(tmp_path,
                                                                              standin):
    glance_conf = tmp_path / "glance-api.conf"
    glance_conf.write_text(
        "[DEFAULT]\nbind_port = 9292\nworkers = 4\n"
        "[keystone_authtoken]\n"
        f"www_authenticate_uri = {standin.url}/v3\nmemcached_servers = 127.0.0.1:11211\n"
        + "".join(f"{k} = {v}\n" for k, v in standin.config().items())
        + "[glance_store]\nstores = file\nfilesystem_store_datadir = /srv/elsewhere\n")
    settings = settings_with(tmp_path, {}, glance_conf)
    assert settings.store.datadir == str(tmp_path / "images")  # ours, not Glance's
    assert GlanceApi(settings.glance_api).image_state(LIVE).state is ImageState.ACTIVE


def test_a_plugin_missing_its_options_or_an_unknown_plugin_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\[keystone_authtoken\]: .*secret"):
        settings_with(tmp_path, {"keystone_authtoken": {
            "auth_type": "v3applicationcredential", "auth_url": "http://127.0.0.1:1/v3",
            "application_credential_id": "abc"}})
    with pytest.raises(ConfigError, match="keystone_authtoken"):
        settings_with(tmp_path, {"keystone_authtoken": {"auth_type": "no-such-plugin"}})


def test_only_a_canonical_uuid_is_ever_put_in_a_url(tmp_path, standin):
    settings = settings_with(tmp_path, {"keystone_authtoken": standin.config()})
    with pytest.raises(Rejected):
        GlanceApi(settings.glance_api).image_state("../../v3/auth/tokens")
    assert standin.requests == []
