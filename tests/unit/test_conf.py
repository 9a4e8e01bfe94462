"""oslo.config: options registered, the sample config is current, bad config fails clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from oslo_config import cfg

from dmore_nova import conf as dconf
from dmore_nova.rm_vm.rfb.server import ConfigError, ServerOptions, options_from_conf

REPO = Path(__file__).resolve().parents[2]


def _conf(tmp_path, text: str) -> cfg.ConfigOpts:
    f = tmp_path / "dmore.conf"
    f.write_text(text)
    conf = cfg.ConfigOpts()
    for m in dconf._MODULES:
        m.register_opts(conf)
    conf(["--config-file", str(f)])
    return conf


def test_list_opts_groups():
    groups = dict(dconf.list_opts())
    assert {"rfb", "agent"} <= set(groups)
    assert "password_file" in {o.name for o in groups["rfb"]}


def test_sample_config_is_current(tmp_path):
    out = tmp_path / "sample.conf"
    subprocess.run([sys.executable, "-m", "oslo_config.generator", "--namespace", "dmore_nova",
                    "--output-file", str(out)], check=True)
    assert out.read_text() == (REPO / "etc" / "dmore-nova.conf.sample").read_text(), \
        "regenerate etc/dmore-nova.conf.sample with oslo-config-generator --namespace dmore_nova"


def test_password_file_turns_on_vnc_auth_and_drops_none(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    conf = _conf(tmp_path, f"[rfb]\npassword_file = {pw}\nsecurity_types = none,vnc\n")
    opts = options_from_conf(conf.rfb)
    assert opts.password == "s3cret" and opts.security_types == ["vnc"]
    assert opts.view_only_password is None


def test_second_password_line_is_view_only(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nlook\n")
    conf = _conf(tmp_path, f"[rfb]\npassword_file = {pw}\n")
    opts = options_from_conf(conf.rfb)
    assert (opts.password, opts.view_only_password) == ("s3cret", "look")
    pw.write_text("s3cret\ns3cret\n")
    with pytest.raises(ConfigError, match="equals"):
        options_from_conf(conf.rfb)


def test_empty_password_file_is_an_error(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("\n")
    conf = _conf(tmp_path, f"[rfb]\npassword_file = {pw}\n")
    with pytest.raises(ConfigError, match="empty"):
        options_from_conf(conf.rfb)


def test_unknown_security_type_refused_by_oslo(tmp_path):
    conf = _conf(tmp_path, "[rfb]\nsecurity_types = none,telnet\n")
    with pytest.raises(ValueError):
        _ = conf.rfb.security_types


@pytest.mark.parametrize("opts,match", [
    (ServerOptions(security_types=["vnc"]), "needs a password"),
    (ServerOptions(security_types=["vencrypt-x509none"]), "tls_cert_file"),
    (ServerOptions(security_types=["vencrypt-plain"]), "plain users"),
    (ServerOptions(security_types=[]), "no security type"),
    (ServerOptions(security_types=["kerberos"]), "unknown security type"),
])
def test_inconsistent_server_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        opts.protocol_config()


def test_bad_plain_users_file(tmp_path):
    from dmore_nova.rm_vm.rfb.server import read_plain_users
    f = tmp_path / "users"
    f.write_text("alice:pw\nbroken-line\n")
    with pytest.raises(ConfigError, match=":2:"):
        read_plain_users(str(f))
