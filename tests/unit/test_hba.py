"""auth_hba_file parser and matcher (pgmulti.hba): PgBouncer's subset of pg_hba.conf."""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import re
import socket
import textwrap
import types

import pytest

from pgmulti import errors, hba
from pgmulti.errors import PgError


def rules(text: str, path: str = "/etc/pgmulti/hba.conf") -> hba.HbaRules:
    return hba.parse(textwrap.dedent(text), path)


def match(r: hba.HbaRules, *, address: str | None = "127.0.0.1", unix: bool = False,
          tls: bool = False, database: str = "db", user: str = "alice") -> str | None:
    rule = r.match(unix=unix, address=address, tls=tls, database=database, user=user)
    return None if rule is None else f"{rule.line}:{rule.method}"


# --- tokens ---


def test_tokenize_quotes_commas_and_comments() -> None:
    assert hba.tokenize('host  "a b",c  all  # comment, "x"') == [
        ("host", False), ("a b", True), (",", False), ("c", False), ("all", False)]
    assert hba.tokenize('"say ""hi"""') == [('say "hi"', True)]
    assert hba.tokenize("") == []
    with pytest.raises(hba.HbaLineError, match="unterminated"):
        hba.tokenize('host "open')


# --- record types and addresses ---


def test_first_matching_line_decides() -> None:
    r = rules("""
        # comment line

        local   all  all                trust
        host    all  bob  10.0.0.0/8    reject
        host    all  all  10.1.0.0/16   md5
        hostssl all  all  0.0.0.0/0     scram-sha-256
        hostnossl all all 0.0.0.0/0     password
        host    all  all  ::1/128       md5
        """)
    assert [rule.line for rule in r.rules] == [4, 5, 6, 7, 8, 9]
    assert match(r, unix=True, address=None) == "4:trust"
    assert match(r, address="10.1.2.3", user="bob") == "5:reject"
    assert match(r, address="10.1.2.3") == "6:md5"
    assert match(r, address="192.0.2.1", tls=True) == "7:scram-sha-256"
    assert match(r, address="192.0.2.1", tls=False) == "8:password"
    assert match(r, address="::1") == "9:md5"
    assert match(r, address="::2") is None


def test_local_lines_never_match_tcp_and_host_lines_never_match_unix() -> None:
    r = rules("local all all trust\n")
    assert match(r, address="127.0.0.1") is None
    r = rules("host all all all trust\n")
    assert match(r, unix=True, address=None) is None
    assert match(r, address="203.0.113.9") == "1:trust"
    assert match(r, address="2001:db8::1") == "1:trust"


def test_address_with_a_separate_mask() -> None:
    r = rules("host all all 192.168.0.0 255.255.0.0 md5\n"
              "host all all 2001:db8:: ffff:ffff:: trust\n")
    assert match(r, address="192.168.77.1") == "1:md5"
    assert match(r, address="192.169.0.1") is None
    assert match(r, address="2001:db8:1::5") == "2:trust"
    assert r.rules[0].network == ipaddress.ip_network("192.168.0.0/16")


def test_ipv4_client_on_a_dual_stack_socket_matches_ipv4_lines() -> None:
    r = rules("host all all 127.0.0.1/32 trust\n")
    assert match(r, address="::ffff:127.0.0.1") == "1:trust"
    assert match(r, address="::1") is None


def test_address_families_do_not_mix() -> None:
    r = rules("host all all ::/0 trust\n")
    assert match(r, address="10.0.0.1") is None
    assert match(r, address="fe80::1%eth0") == "1:trust"


def test_host_bits_beyond_the_mask_are_ignored_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, "pgmulti.hba"):
        r = rules("host all all 10.1.2.3/8 trust\n")
    assert match(r, address="10.200.0.1") == "1:trust"
    assert "beyond the mask" in caplog.text


# --- databases and users ---


def test_database_and_user_lists() -> None:
    r = rules("""
        host sales,"Mixed Case",hr  alice,"bob smith"  all  md5
        host sameuser               all                all  trust
        host all                    all                all  reject
        """)
    assert match(r, database="sales") == "2:md5"
    assert match(r, database="Mixed Case", user="bob smith") == "2:md5"
    assert match(r, database="mixed case") == "4:reject"
    assert match(r, database="hr", user="carol") == "4:reject"
    assert match(r, database="carol", user="carol") == "3:trust"


def test_quoted_keywords_are_plain_names() -> None:
    r = rules('host "all" "sameuser" all trust\n')
    assert match(r, database="all", user="sameuser") == "1:trust"
    assert match(r, database="db", user="alice") is None


def test_replication_keyword_matches_no_pooled_connection() -> None:
    r = rules("host replication all all trust\nhost all all all md5\n")
    assert match(r, database="replication") == "2:md5"


def test_name_files(tmp_path) -> None:
    (tmp_path / "dbs.txt").write_text("sales, hr\n# a comment\nops\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "admins").write_text('"Ann Lee" root\n@more\n')
    (sub / "more").write_text("zed\n")
    path = str(tmp_path / "hba.conf")
    r = hba.parse("host @dbs.txt @sub/admins,alice all md5\n", path)
    assert r.problems == []
    for database, user in [("sales", "Ann Lee"), ("ops", "root"), ("hr", "alice"),
                           ("hr", "zed")]:
        assert match(r, database=database, user=user) == "1:md5"
    assert match(r, database="other", user="alice") is None
    assert match(r, database="ops", user="bob") is None


def test_name_file_including_itself_is_refused(tmp_path) -> None:
    (tmp_path / "loop").write_text("a, @loop\n")
    r = hba.parse("host @loop all all trust\nhost all all all md5\n", str(tmp_path / "hba"))
    assert [rule.line for rule in r.rules] == [2]
    assert "nested too deeply" in r.problems[0]


# --- lines pgmulti (and PgBouncer) cannot use ---


@pytest.mark.parametrize("line, problem", [
    ("hostgssenc all all all trust", "unknown record type"),
    ("host samerole all all trust", "samerole is not supported"),
    ("host samegroup all all trust", "samegroup is not supported"),
    ("host all +admins all trust", r"group membership \(\+name\) is not supported"),
    ("host all all samehost trust", "samehost is not supported"),
    ("host all all samenet trust", "samenet is not supported"),
    ("host all all db.example.com trust", "host names are not supported"),
    ("host all all 10.0.0.0/33 trust", "invalid CIDR mask"),
    ("host all all 10.0.0.0/x trust", "invalid CIDR mask"),
    ("host all all 10.0.0.0 255.0.255.0 trust", "not contiguous"),
    ("host all all 10.0.0.0 ffff:: trust", "family"),
    ("host all all 10.0.0.0 trust", "invalid IP mask"),
    ("host all all 10.0.0.0/8", "unsupported authentication method"),
    ("host all all 10.0.0.0/8 gss", "unsupported authentication method gss"),
    ("host all all all ldap ldapserver=x ldapbindpasswd=TopSecret",
     "unsupported authentication method ldap"),
    ("host all all all cert map=omicron", "ident map 'omicron' is not in auth_ident_file"),
    ("host all all all md5 map=omicron", "map= is supported with the cert and peer methods"),
    ("host all all all md5 clientcert=verify-ca", "options after the authentication method"),
    ("host all", "missing user name"),
    ("host all all", "missing address"),
    ("host ,all all all trust", "missing database"),
    ("host all, all all trust", "invalid IP address"),
    ("host @/nonexistent/file all all trust", "cannot read /nonexistent/file"),
])
def test_unusable_line_is_skipped_and_reported_with_file_and_line(line, problem, caplog) -> None:
    with caplog.at_level(logging.WARNING, "pgmulti.hba"):
        r = hba.parse(f"# first\n{line}\nhost all all all trust\n", "/x/hba.conf")
    assert [rule.line for rule in r.rules] == [3]
    assert len(r.problems) == 1
    assert r.problems[0].startswith("/x/hba.conf:2: ")
    assert r.problems[0].endswith("; line ignored")
    assert re.search(problem, r.problems[0]), r.problems[0]
    assert "/x/hba.conf:2: " in caplog.text
    assert "TopSecret" not in caplog.text and "TopSecret" not in r.problems[0]


def test_missing_file_rejects_everyone(tmp_path, caplog) -> None:
    with caplog.at_level(logging.ERROR, "pgmulti.hba"):
        r = hba.load(str(tmp_path / "absent.conf"))
    assert r.rules == ()
    assert "could not open auth_hba_file" in caplog.text
    assert match(r) is None


# --- the decision ---


def _config(path: str, ident_path: str = ""):
    return types.SimpleNamespace(pgbouncer=types.SimpleNamespace(auth_hba_file=path,
                                                                 auth_ident_file=ident_path))


def test_method_for_maps_password_and_raises_postgres_errors(tmp_path) -> None:
    path = tmp_path / "hba.conf"
    path.write_text("local all all peer\nhost all bad all reject\n"
                    "host all all 127.0.0.1/32 password\n")
    config = _config(str(path))
    assert hba.method_for(config, unix=True, address=None, tls=False, database="d",
                          user="u") == ("peer", None)
    assert hba.method_for(config, unix=False, address="127.0.0.1", tls=True, database="d",
                          user="u") == ("plain", None)
    with pytest.raises(PgError) as info:
        hba.method_for(config, unix=False, address="127.0.0.1", tls=True, database="d",
                       user="bad")
    assert (info.value.sqlstate, info.value.fatal) == (errors.INVALID_AUTHORIZATION_SPECIFICATION,
                                                       True)
    assert info.value.message == ('pg_hba.conf rejects connection for host "127.0.0.1", '
                                  'user "bad", database "d", SSL encryption')
    with pytest.raises(PgError) as info:
        hba.method_for(config, unix=False, address="10.0.0.1", tls=False, database="d",
                       user="u")
    assert info.value.sqlstate == "28000"
    assert info.value.message == ('no pg_hba.conf entry for host "10.0.0.1", user "u", '
                                  'database "d", no encryption')


def test_rules_are_read_again_only_for_a_new_configuration(tmp_path) -> None:
    path = tmp_path / "hba.conf"
    path.write_text("host all all all trust\n")
    config = _config(str(path))
    first = hba.rules_for(config)
    path.write_text("host all all all reject\n")
    assert hba.rules_for(config) is first  # no reload yet: the old rules stay
    reloaded = hba.rules_for(_config(str(path)))
    assert reloaded is not first and reloaded.rules[0].method == "reject"


# --- certificates and peers ---


def test_certificate_names_follow_libtls() -> None:
    only_cn = {"subject": ((("countryName", "FI"),), (("commonName", "alice"),))}
    assert hba.certificate_names(only_cn) == ["alice"]
    assert hba.certificate_matches(only_cn, "alice")
    assert hba.certificate_matches(only_cn, "ALICE")
    assert not hba.certificate_matches(only_cn, "bob")
    # DNS subjectAltNames, when present, are the names (the CN is then not used).
    with_san = {"subject": ((("commonName", "alice"),),),
                "subjectAltName": (("DNS", "bob"), ("IP Address", "127.0.0.1"))}
    assert hba.certificate_names(with_san) == ["bob"]
    assert hba.certificate_matches(with_san, "bob")
    assert not hba.certificate_matches(with_san, "alice")
    # Not verified (empty dict) or absent: no name.
    assert not hba.certificate_matches({}, "alice")
    assert not hba.certificate_matches(None, "alice")


def test_peer_user_name_of_a_unix_socket_pair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert hba.peer_user_name(left) == pwd.getpwuid(os.getuid()).pw_name
    tcp = socket.socket()
    with tcp:
        assert hba.peer_user_name(tcp) is None
    assert hba.peer_user_name(None) is None


# --- ident maps (auth_ident_file) ---


IDENT_FILE = """\
# map   system user   database user
omicron  robert        bob
omicron  "ann smith"   ann
omicron  ann           "ann2"
ops      root          all
bad line
too many words here
"""


def test_ident_file_lines(caplog) -> None:
    with caplog.at_level(logging.WARNING, "pgmulti.hba"):
        maps = hba.parse_ident(IDENT_FILE, "/x/ident.conf")
    assert maps["omicron"].mappings == (("robert", "bob"), ("ann smith", "ann"), ("ann", "ann2"))
    assert maps["ops"].mappings == (("root", None),)
    assert "/x/ident.conf:6: " in caplog.text and "/x/ident.conf:7: " in caplog.text


def test_ident_map_allows_mapped_pairs_only() -> None:
    maps = hba.parse_ident(IDENT_FILE, "/x/ident.conf")
    omicron, ops = maps["omicron"], maps["ops"]
    assert omicron.allows(["robert"], "bob")
    assert not omicron.allows(["robert"], "robert")  # the map replaces the same-name rule
    assert not omicron.allows(["bob"], "bob")
    assert omicron.allows(["ann"], "ann2") and not omicron.allows(["ann"], "ann")
    assert ops.allows(["root"], "anyone") and not ops.allows(["toor"], "anyone")
    assert omicron.allows(["ROBERT"], "bob", fold_case=True)  # certificate names
    assert not omicron.allows(["ROBERT"], "bob")


def test_map_option_on_cert_and_peer_lines(tmp_path) -> None:
    ident = tmp_path / "ident.conf"
    ident.write_text(IDENT_FILE)
    hba_file = tmp_path / "hba.conf"
    hba_file.write_text("local all all peer map=ops\nhostssl all all all cert map=omicron\n")
    config = _config(str(hba_file), str(ident))
    method, ident_map = hba.method_for(config, unix=True, address=None, tls=False,
                                       database="d", user="u")
    assert (method, ident_map.name) == ("peer", "ops")
    method, ident_map = hba.method_for(config, unix=False, address="10.1.2.3", tls=True,
                                       database="d", user="u")
    assert (method, ident_map.name) == ("cert", "omicron")
    cert = {"subject": ((("commonName", "Robert"),),)}
    assert hba.certificate_matches(cert, "bob", ident_map)
    assert not hba.certificate_matches(cert, "robert", ident_map)
    assert hba.certificate_matches(cert, "robert")  # no map: the name itself


def test_missing_ident_file_drops_the_lines_that_use_it(tmp_path, caplog) -> None:
    hba_file = tmp_path / "hba.conf"
    hba_file.write_text("local all all peer map=ops\nlocal all all trust\n")
    with caplog.at_level(logging.WARNING, "pgmulti.hba"):
        rules = hba.load(str(hba_file), str(tmp_path / "absent.conf"))
    assert [rule.line for rule in rules.rules] == [2]
    assert "could not open auth_ident_file" in caplog.text
