"""oslo.config options for every dmore-nova service, one group per part.

``list_opts()`` is the ``oslo.config.opts`` entry point, so ``oslo-config-generator
--namespace dmore_nova`` writes etc/dmore-nova.conf.sample.
"""

from __future__ import annotations

from oslo_config import cfg

from dmore_nova.conf import agent, console, demo, rfb

CONF = cfg.CONF

_MODULES = (rfb, agent, console, demo)

for _m in _MODULES:
    _m.register_opts(CONF)


def list_opts():
    return [(m.GROUP.name, m.OPTS) for m in _MODULES]
