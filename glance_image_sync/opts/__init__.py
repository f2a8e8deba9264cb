"""Every option of glance-image-sync, with its help text, by group.

The tool's own options live in ``[DEFAULT]`` of
``/etc/glance/glance-image-sync.conf``. The optional credentials for Glance's
API are keystoneauth1's own options in ``[keystone_authtoken]`` (where Glance
keeps its service user's), read with keystoneauth1's loading helpers; where to
find the API is in ``[glance_api]``. ``api_nodes``, ``rsync_user``,
``log_file`` and ``verbose`` are the names the original cron tool used; they
keep working. ``list_opts`` feeds ``oslo-config-generator``
(``etc/glance-image-sync.conf.sample``).

The settings that must agree with Glance's are Glance's own: ``transport_url``
in ``[DEFAULT]`` and ``rabbit_opts`` in ``[oslo_messaging_rabbit]`` carry
oslo.messaging's names, types, defaults and meaning, so that Glance's own
glance-api.conf can be passed as the first ``--config-file`` and the two
cannot disagree (``tests/test_glance_config.py`` compares them with
oslo.messaging's own definitions).
"""

from keystoneauth1 import loading as ks_loading

from glance_image_sync.opts.default import (
    cluster_opts,
    delete_opts,
    legacy_opts,
    messaging_opts,
    metrics_opts,
    store_opts,
    transfer_opts,
)
from glance_image_sync.opts.glance import (
    API_GROUP,
    AUTH_GROUP,
    RABBIT_GROUP,
    REMOVED,
    glance_api_opts,
    rabbit_opts,
    removed_opts,
)

__all__ = ["API_GROUP", "AUTH_GROUP", "RABBIT_GROUP", "REMOVED", "cluster_opts", "delete_opts",
           "glance_api_opts", "legacy_opts", "list_opts", "messaging_opts", "metrics_opts",
           "rabbit_opts", "register_opts", "removed_opts", "store_opts", "transfer_opts"]


def list_opts():
    """Every option, by group, for oslo-config-generator.

    ``[keystone_authtoken]`` lists keystoneauth1's session options and those
    of its ``password`` plugin, the one Glance's own file uses; another
    ``auth_type`` brings its own options.
    """
    return [
        (
            "DEFAULT",
            cluster_opts + messaging_opts + store_opts + delete_opts + transfer_opts
            + metrics_opts + legacy_opts,
        ),
        (API_GROUP, glance_api_opts),
        (AUTH_GROUP, ks_loading.get_auth_common_conf_options()
         + ks_loading.get_session_conf_options()
         + ks_loading.get_auth_plugin_conf_options("password")),
        (RABBIT_GROUP, rabbit_opts),
    ]


def register_opts(conf):
    for group, opts in list_opts():
        if group == AUTH_GROUP:
            # keystoneauth1's helpers: the plugin's own options are registered
            # when the plugin named by auth_type is loaded.
            ks_loading.register_auth_conf_options(conf, AUTH_GROUP)
            ks_loading.register_session_conf_options(conf, AUTH_GROUP)
            continue
        conf.register_opts(opts, group=None if group == "DEFAULT" else group)
    conf.register_opts(removed_opts)
